#!/usr/bin/env bash
# stream.sh - what writing a large new protected file costs under the in-process shield (issue
# 8, "bounded memory"), with the file sealed while it is written (the default) and held whole
# until its close (FSPF_STREAM_MB=0, what every new file did before), beside native, in one run.
#
# Usage (from anywhere in the repo):   bash bench/stream.sh
# Knobs (env):  SIZE_MB=1024     size of the file (MiB)
#               RUNS=3           runs per mode; every number is the median of RUNS
#               BENCH_BASE=/var/tmp   where the volume's kernel directory lives
#               SKIP_BUILD=1     use target/release as is
# What is timed (wall time of the whole command, `fspf run` included):
#   dd    `dd if=SRC of=F bs=1M count=SIZE_MB conv=fsync` (SRC: a plain file of random bytes,
#         read once before, so the page cache serves it)
#   py8k  the real python3 interpreter binary writing F in 8 KiB writes (Python's buffer size),
#         then closing it
# Memory: the peak of /dev/shm's use during the dd (the run's buffers live there), sampled
# every 20 ms, and dd's peak RSS (GNU time's %M) - together the memory the shielded writer holds.
set -Eeuo pipefail
SIZE_MB=${SIZE_MB:-1024}
RUNS=${RUNS:-3}
BENCH_BASE=${BENCH_BASE:-/var/tmp}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
release_build
[[ -x /usr/bin/time ]] || die "GNU time required (apt-get install time)"
real_python
W=$(mktemp -d "$BENCH_BASE/stream.XXXXXX")
trap 'kill $SAMPLER 2>/dev/null || true; rm -rf "$W"' EXIT
SAMPLER=
V="$W/vol"
mkdir -p "$V" "$W/native"
F="$W/fspf.pb"
encrypted_volume "$W" "$V"
SRC="$W/src"
head -c $((SIZE_MB << 20)) /dev/urandom > "$SRC"
cat "$SRC" > /dev/null
cat > "$W/py8k.py" <<'PYEOF'
import sys
n = int(sys.argv[2]) << 20
b = bytes(range(256)) * 32
with open(sys.argv[1], 'wb') as f:
    for _ in range(n // len(b)):
        f.write(b)
PYEOF
shm_used() { df -B1 --output=used /dev/shm | tail -1; }
# measure CMD...: run CMD, print "seconds peak_shm_MiB peak_rss_MiB"
measure() {
  local base peakf=$W/peak t0 t1
  base=$(shm_used); echo 0 > "$peakf"
  ( p=0; while :; do u=$(( $(shm_used) - base )); if (( u > p )); then p=$u; echo $p > "$peakf"; fi; sleep 0.02; done ) >/dev/null 2>&1 &
  SAMPLER=$!
  t0=$(date +%s.%N)
  /usr/bin/time -f %M -o "$W/rss" "$@" >/dev/null
  t1=$(date +%s.%N)
  kill $SAMPLER; wait $SAMPLER 2>/dev/null || true; SAMPLER=
  awk -v a="$t0" -v b="$t1" -v s="$(cat "$peakf")" -v r="$(tail -1 "$W/rss")" \
    'BEGIN { printf "%.3f %.1f %.1f\n", b - a, s / 1048576, r / 1024 }'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A R
for ((i = 1; i <= RUNS; i++)); do
  for mode in native fspf whole; do
    case $mode in
      native) tgt="$W/native/f"; pre=() ;;
      fspf) tgt="$V/f"; pre=(env FSPF_STREAM_MB=64) ;;
      whole) tgt="$V/f"; pre=(env FSPF_STREAM_MB=0) ;;
    esac
    [[ $mode == native ]] || pre+=("$FSPF" run --fspf "$F" --key-file "$W/key" --tag "$(head -1 "$W/tag")" --mutable --tag-file "$W/tag" --)
    rm -f "$W/native/f"
    log "run $i: $mode dd"
    measure "${pre[@]}" dd if="$SRC" of="$tgt" bs=1M count="$SIZE_MB" conv=fsync status=none > "$W/m"
    read -r t s r < "$W/m"
    R[$mode.dd]+="$t "; R[$mode.shm]+="$s "; R[$mode.rss]+="$r "
    log "run $i: $mode py8k"
    [[ $mode == native ]] || pre=("${pre[@]:0:2}" "$FSPF" run --fspf "$F" --key-file "$W/key" --tag "$(head -1 "$W/tag")" --mutable --tag-file "$W/tag" --)
    measure "${pre[@]}" "$PY" "$W/py8k.py" "$tgt" "$SIZE_MB" > "$W/m"
    read -r t s r < "$W/m"
    R[$mode.py]+="$t "; R[$mode.pyshm]+="$s "
  done
done
m() { tr ' ' '\n' <<<"${R[$1]}" | grep . | median; }
printf '\n%s MiB new file, medians of %s runs\n\n' "$SIZE_MB" "$RUNS"
printf '| mode | dd s | dd MB/s | held MiB (shm peak + dd RSS) | py8k s | py8k shm peak MiB |\n|---|---|---|---|---|---|\n'
for mode in native fspf whole; do
  name=$mode; [[ $mode == whole ]] && name="fspf, FSPF_STREAM_MB=0 (held whole, as before)"
  awk -v n="$name" -v t="$(m $mode.dd)" -v s="$(m $mode.shm)" -v r="$(m $mode.rss)" -v p="$(m $mode.py)" -v ps="$(m $mode.pyshm)" -v mb="$SIZE_MB" \
    'BEGIN { printf "| %s | %.2f | %.0f | %.0f | %.2f | %.0f |\n", n, t, mb * 1.048576 / t, s + r, p, ps }'
done
awk -v a="$(m fspf.dd)" -v b="$(m native.dd)" -v c="$(m whole.dd)" -v p="$(m fspf.py)" -v q="$(m whole.py)" -v n="$(m native.py)" \
  'BEGIN { printf "\nratios: dd fspf/native time %.2fx, fspf/held-whole %.2fx; py8k fspf/native %.2fx, fspf/held-whole %.2fx\n", a / b, a / c, p / n, p / q }'
