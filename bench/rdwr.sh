#!/usr/bin/env bash
# rdwr.sh - what opening a large protected file to read and write costs under the in-process
# shield (issue 8, "bounded memory"): the open, and the buffer the run keeps in memory after a
# few reads and writes, with the file left unloaded where it was not used (the default) and
# loaded whole at its open (FSPF_LAZY_RDWR=0, what every such open did before), in one run.
#
# Usage (as root or not, from anywhere in the repo):   bash bench/rdwr.sh
# Knobs (env):  SIZE_MB=1024     size of the file (MiB)
#               OPS=100          random 4 KiB pwrite, then as many random 4 KiB pread
#               RUNS=3           runs per mode; every number is the median of RUNS
#               BENCH_BASE=/var/tmp   where the volume's kernel directory lives
#               SKIP_BUILD=1     use target/release as is
# What is timed: in the real python3 interpreter binary (not a pyenv shim), under `fspf run
# --mutable`, with time.perf_counter: os.open(F, O_RDWR); the first 64 MiB read twice in 4 KiB
# preads (read1 loads, read2 reads what is loaded); 5 000 unaligned 4 KiB pwrites into them.
# Memory: the kernel's allocation of the buffer (st_blocks of the program's descriptor, by a raw
# fstat the shield does not see), after OPS random writes and reads.
set -Eeuo pipefail
SIZE_MB=${SIZE_MB:-1024}
OPS=${OPS:-100}
RUNS=${RUNS:-3}
BENCH_BASE=${BENCH_BASE:-/var/tmp}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
release_build
real_python
W=$(mktemp -d "$BENCH_BASE/rdwr.XXXXXX")
trap 'rm -rf "$W"' EXIT
V="$W/vol"
mkdir -p "$V"
F="$W/fspf.pb"
encrypted_volume "$W" "$V"
run() { "$FSPF" run --fspf "$F" --key-file "$W/key" --tag "$(head -1 "$W/tag")" --mutable --tag-file "$W/tag" -- "$@"; }
log "writing a $SIZE_MB MiB protected file"
run dd if=/dev/urandom of="$V/big" bs=1M count="$SIZE_MB" conv=fsync status=none
cat > "$W/rdwr.py" <<'EOF'
import ctypes, os, random, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def allocated(fd):
    st = ctypes.create_string_buffer(144)
    assert libc.syscall(5, fd, st) == 0, ctypes.get_errno()
    return int.from_bytes(st.raw[64:72], 'little') * 512
path, ops, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
fd = os.open(path, os.O_RDWR)
t1 = time.perf_counter()
rng = random.Random(seed)
blocks = os.fstat(fd).st_size // 4096
for _ in range(ops):
    os.pwrite(fd, os.urandom(4096), rng.randrange(blocks) * 4096)
for _ in range(ops):
    assert len(os.pread(fd, 4096, rng.randrange(blocks) * 4096)) == 4096
mem = allocated(fd) / 2**20
# The first 64 MiB read twice in 4 KiB preads, then 5 000 unaligned 4 KiB pwrites into them.
span = min(64 << 20, blocks * 4096)
passes = []
for _ in range(2):
    t = time.perf_counter()
    off = 0
    while off < span:
        off += len(os.pread(fd, 4096, off))
    passes.append(time.perf_counter() - t)
b = os.urandom(4096)
t = time.perf_counter()
for _ in range(5000):
    os.pwrite(fd, b, rng.randrange(span // 4096 - 1) * 4096 + 100)
w = time.perf_counter() - t
print("%.3f %.1f %.3f %.3f %.3f" % ((t1 - t0) * 1000, mem, passes[0], passes[1], w))
os.close(fd)
EOF
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A RES
for mode in lazy whole; do
  declare -a c0=() c1=() c2=() c3=() c4=()
  for ((i=0; i<RUNS; i++)); do
    if [[ $mode == whole ]]; then
      r=$(FSPF_LAZY_RDWR=0 run "$PY" "$W/rdwr.py" "$V/big" "$OPS" "$i")
    else
      r=$(run "$PY" "$W/rdwr.py" "$V/big" "$OPS" "$i")
    fi
    read -r a b c d e <<<"$r"
    c0+=("$a"); c1+=("$b"); c2+=("$c"); c3+=("$d"); c4+=("$e")
  done
  RES[$mode]="$(median "${c0[@]}") $(median "${c1[@]}") $(median "${c2[@]}") $(median "${c3[@]}") $(median "${c4[@]}")"
  log "$mode: ${RES[$mode]}"
done
FMT='%-38s %9s %11s %11s %11s %11s\n'
printf "\n$FMT" "O_RDWR open of a $SIZE_MB MiB file" "open ms" "buffer MiB" "read1 s" "read2 s" "writes s"
# shellcheck disable=SC2086  # the five numbers are words
printf "$FMT" "fspf (default: unloaded until used)" ${RES[lazy]}
# shellcheck disable=SC2086
printf "$FMT" "fspf, FSPF_LAZY_RDWR=0 (loaded whole)" ${RES[whole]}
printf '(buffer: after %d random 4 KiB writes and %d reads; read1/read2: the first 64 MiB in 4 KiB\n' "$OPS" "$OPS"
printf ' preads, twice; writes: 5 000 unaligned 4 KiB pwrites into them; medians of %d)\n' "$RUNS"
