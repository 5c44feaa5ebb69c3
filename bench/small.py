# small.py - the small-file workload of bench/shield.sh and bench/writes.sh (as in
# ../shared/bench/anchors.sh): MODE ROOT N; create N files of 1-4 KiB in 10 directories below
# ROOT and sync, or read them all back; prints the seconds it took.
import os, random, sys, time
mode, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(1234)
buf = random.Random(99).randbytes(8192) if hasattr(random.Random, "randbytes") else os.urandom(8192)
sizes = [rng.randint(1024, 4096) for _ in range(n)]
paths = [os.path.join(root, "d%02d" % (i % 10), "f%05d" % i) for i in range(n)]
t0 = time.perf_counter()
if mode == "create":
    for d in range(10):
        os.makedirs(os.path.join(root, "d%02d" % d), exist_ok=True)
    for i, (p, s) in enumerate(zip(paths, sizes)):
        with open(p, "wb") as f:
            f.write(buf[i % 4096:i % 4096 + s])
    os.sync()
else:
    tot = 0
    for p in paths:
        with open(p, "rb") as f:
            tot += len(f.read())
    assert tot == sum(sizes), (tot, sum(sizes))
print("%.6f" % (time.perf_counter() - t0))
