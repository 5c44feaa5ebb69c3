# flushes.py - what the durable steps of one in-place update commit cost on a file system,
# without fspf: the floor under `bench/writes.sh`'s randw column (issue 8), as ratios against a
# native 4 KiB pwrite + fdatasync measured in the same run.
#
# Usage:  python3 bench/flushes.py [DIR] [N]     (DIR: a directory on the file system to measure,
#         default /var/tmp; N: operations per step, default 300). Prints microseconds per
#         operation (median of 3 rounds) and the ratio to the native row.
#
# Rows (each is N repetitions of what one commit does there):
#   native        pwrite 4 KiB at a random offset of a 64 MiB file + fdatasync (randw's native op)
#   journal-new   create a new 16.6 KB file + write + fdatasync, then unlink it (an update journal)
#   journal-slot  overwrite 16.6 KB at offset 0 of an existing file + fdatasync (no new inode)
#   anchor        the tag file's announce: overwrite 66 bytes + ftruncate(66) + fdatasync, then the
#                 publish (33 bytes + ftruncate(33), not synced)
#   log           append a 155-byte record + fdatasync (the commit point)
#   log-prealloc  the same record written over zeros preallocated in 64 KiB steps + fdatasync
#                 (the file's size changes once per 64 KiB)
#   log-journal   log-prealloc with a 4.6 KB record: the journal of one 4 KiB overwrite in it
#   data+tree     overwrite 4 KiB in two other files + fdatasync each (what a commit synced after
#                 applying its journal before journals were chained; now once per settle)
#   commit-s21    journal-new + anchor + log + data+tree (session 21: applied and synced at once)
#   commit-s22    journal-new + anchor + log-prealloc (session 22: deferred application)
#   commit-now    anchor + log-journal (the journal in the log record: one in-place update
#                 commit today)
import os, random, statistics, sys, time

root = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
d = os.path.join(root, "fspf-flushes-%d" % os.getpid())
os.mkdir(d)
rng = random.Random(7)


def mk(name, size):
    f = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(f, b"\0" * size)
    os.fsync(f)
    return f


big = mk("big", 64 << 20)
slot = mk("slot", 16630)
tag = mk("tag", 33)
data = mk("data", 8 << 20)
tree = mk("tree", 8 << 20)
log = os.open(os.path.join(d, "log"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
log_end = [0]
dfd = os.open(d, os.O_RDONLY)
os.fsync(dfd)
jbuf = os.urandom(16630)
blk = os.urandom(4096)


def native(i):
    os.pwrite(big, blk, rng.randrange(16384) * 4096)
    os.fdatasync(big)


def journal_new(i):
    p = os.path.join(d, "j%d" % i)
    f = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(f, jbuf)
    os.fdatasync(f)
    os.close(f)
    os.unlink(p)


def journal_slot(i):
    os.pwrite(slot, jbuf, 0)
    os.fdatasync(slot)


def anchor(i):
    os.pwrite(tag, b"a" * 66, 0)
    os.ftruncate(tag, 66)
    os.fdatasync(tag)
    os.pwrite(tag, b"b" * 33, 0)
    os.ftruncate(tag, 33)


def log_append(i):
    os.pwrite(log, b"r" * 155, log_end[0])
    log_end[0] += 155
    os.fdatasync(log)


pre = os.open(os.path.join(d, "prelog"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
pre_end = [0, 0]  # record end, file length


def prealloc_append(rec):
    end = pre_end[0] + len(rec)
    while end > pre_end[1]:
        os.pwrite(pre, b"\0" * (64 << 10), pre_end[1])
        pre_end[1] += 64 << 10
    os.pwrite(pre, rec, pre_end[0])
    pre_end[0] = end
    os.fdatasync(pre)


def log_prealloc(i):
    prealloc_append(b"r" * 155)


jrec = os.urandom(4600)


def log_journal(i):
    prealloc_append(jrec)


def data_tree(i):
    for f in (data, tree):
        os.pwrite(f, blk, rng.randrange(2048) * 4096)
        os.fdatasync(f)


def commit_s21(i):
    journal_new(i)
    anchor(i)
    log_append(i)
    data_tree(i)


def commit_s22(i):
    journal_new(i)
    anchor(i)
    log_prealloc(i)


def commit_now(i):
    anchor(i)
    log_journal(i)


rows = [
    ("native", native),
    ("journal-new", journal_new),
    ("journal-slot", journal_slot),
    ("anchor", anchor),
    ("log", log_append),
    ("log-prealloc", log_prealloc),
    ("log-journal", log_journal),
    ("data+tree", data_tree),
    ("commit-s21", commit_s21),
    ("commit-s22", commit_s22),
    ("commit-now", commit_now),
]
res = {name: [] for name, _ in rows}
try:
    for _ in range(3):
        for name, step in rows:
            t = time.perf_counter()
            for i in range(n):
                step(i)
            res[name].append((time.perf_counter() - t) / n * 1e6)
finally:
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)
base = statistics.median(res["native"])
print("%-14s %10s %8s" % ("step", "us/op", "x native"))
for name, _ in rows:
    m = statistics.median(res[name])
    print("%-14s %10.0f %8.2f" % (name, m, m / base))
