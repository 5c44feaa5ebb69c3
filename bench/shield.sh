#!/usr/bin/env bash
# shield.sh - the in-process shield (libfspf_preload.so) against native plaintext and gocryptfs,
# measured in the same run with the same workloads as /work/shared/bench/anchors.sh.
#
# Usage (as root, from anywhere in the repo):   bash bench/shield.sh
# Quick run:                                     SIZE_MB=64 NFILES=1000 RUNS=1 bash bench/shield.sh
# Knobs (env):  SIZE_MB=1024 NFILES=10000 RUNS=3 SMALL_RUNS=3 RAND_SECS=5
#               BENCH_BASE=/var/tmp   backing directory for all three (ext4 here, like anchors.sh)
#               FSLIST="plain gocryptfs fspf"
#               SHIELD_MODE=run|env   run: fspf run --fspf F --key K --tag T --mutable -- PROG
#                                     env: LD_PRELOAD=libfspf_preload.so SCONE_FSPF=F
#                                          SCONE_FSPF_KEY=K SCONE_FSPF_TAG=T SCONE_FSPF_MUTABLE=1 PROG
#               CHUNK_LEN=<bytes>     chunk length of the fspf region (default: fspf's, 4096 for encrypted regions);
#                                     4096 shows the random-read / throughput trade-off
#               RESULTS_FILE=<path>   (also write the final table there)
#               SKIP_BUILD=1          (use target/release as is)
#
# Per file system (medians of RUNS / SMALL_RUNS):
#   seqW   dd bs=1M conv=fsync of a SIZE_MB file of random bytes (source on tmpfs)
#   seqRc  dd read after sync + drop_caches + 1.5 s idle
#   seqRw  the same read again at once (warm page cache; fspf still verifies and decrypts every chunk)
#   catRw  warm `cat FILE > /dev/null` (reads through the hooks with 128 KiB reads). dd's `if=`
#          re-opens the file onto stdin with dup2, and the shield then fills a memfd with the
#          whole verified plaintext (glibc's stdin reads bypass the hooks), so seqRw measures that
#          fill; catRw measures the shield's read path itself
#   rrW    fio psync 4 KiB random reads for RAND_SECS after a full sequential read (warm), IOPS
#   smC    create NFILES files of 1-4 KiB in 10 dirs + os.sync(), files/s
#   smR    read them all back (warm), files/s
# For fspf every program runs under the shield, in one encrypted mutable kernel region whose kernel
# path is the directory the program writes to (embed path = kernel path, like `fspf create-volume`).
# Times are wall-clock around the whole process, so a commit at exit is counted. After each
# mutating step the new tag is taken from `fspf run --tag-file` (the run's own report) when that
# option exists, else read with `fspf show --tag` (fine for a benchmark; see docs/THREAT-MODEL.md
# on where a real run should take its tag from).
#
# Targets (DESIGN.md §5): warm seq read >= 5x gocryptfs and >= 0.35x native; warm random 4 KiB
# >= 10x gocryptfs (and >= 0.40x native IOPS); seq write >= 5x gocryptfs; small-file create and
# read >= 5x gocryptfs.
set -Eeuo pipefail

SIZE_MB=${SIZE_MB:-1024}
NFILES=${NFILES:-10000}
RUNS=${RUNS:-3}
SMALL_RUNS=${SMALL_RUNS:-3}
RAND_SECS=${RAND_SECS:-5}
BENCH_BASE=${BENCH_BASE:-/var/tmp}
FSLIST=${FSLIST:-"plain gocryptfs fspf"}
SHIELD_MODE=${SHIELD_MODE:-run}
RESULTS_FILE=${RESULTS_FILE:-}
PW="shield-bench-password"   # throwaway password for a throwaway gocryptfs

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
[[ $EUID -eq 0 ]] || die "run as root (needs apt-get, /dev/fuse, drop_caches)"

FSPF="$REPO/target/release/fspf"
PRELOAD="$REPO/target/release/libfspf_preload.so"

# ---------------------------------------------------------------- install + build
install_missing gocryptfs=gocryptfs fusermount3=fuse3 fio=fio python3=python3 mountpoint=util-linux
command -v python3 >/dev/null || die "python3 required"
command -v fio >/dev/null || die "fio required"
# the real interpreter, not a pyenv shim script (the shim would be shielded too and cost a bash start)
PY=$(python3 -c 'import sys; print(sys.executable)')
if [[ " $FSLIST " == *" fspf "* ]]; then
  if [[ -z ${SKIP_BUILD:-} ]]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release -q) || die "cargo build --release failed"
  fi
  [[ -x $FSPF ]] || die "$FSPF missing: build with 'cargo build --release'"
  [[ -f $PRELOAD ]] || die "$PRELOAD missing: the in-process shield (crates/fspf-preload) has not been built or has not landed yet; build with 'cargo build --release -p fspf-preload' or run with FSLIST=\"plain gocryptfs\""
  if [[ $SHIELD_MODE == run ]] && ! "$FSPF" run --help 2>/dev/null | grep -q -- '--fspf'; then
    die "'fspf run' does not take --fspf yet (the shield CLI has not landed); try SHIELD_MODE=env"
  fi
fi

# ---------------------------------------------------------------- workspace / cleanup
W=$(mktemp -d "$BENCH_BASE/shield.XXXXXX")
SRC=$(mktemp /dev/shm/shield-src.XXXXXX)
GMNT=""; GPID=""
cleanup() {
  local rc=$? i
  set +e
  if [[ -n $GMNT ]] && mountpoint -q "$GMNT"; then
    for i in 1 2 3 4 5 6 7 8 9 10; do fusermount3 -u "$GMNT" 2>/dev/null && break; sleep 1; done
    mountpoint -q "$GMNT" && fusermount3 -uz "$GMNT"
  fi
  [[ -n $GPID ]] && wait "$GPID" 2>/dev/null
  if findmnt -rn -o TARGET | grep -q "^$W"; then log "mount under $W still present; leaving $W"; else rm -rf "$W"; fi
  rm -f "$SRC"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DROP=1
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || { DROP=0; log "drop_caches not permitted: 'cold' = not-recently-used only"; }
cold() { sync; if ((DROP)); then echo 3 > /proc/sys/vm/drop_caches; fi; sleep 1.5; }

now() { date +%s.%N; }
el()  { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.6f", b-a}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "n/a"} else if(NR%2){print a[(NR+1)/2]} else {printf "%.6g\n",(a[NR/2]+a[NR/2+1])/2} }'; }
mbps() { awk -v s="$1" -v mb="$SIZE_MB" 'BEGIN{printf "%.0f", mb*1.048576/s}'; }   # MB = 1e6 bytes
rate() { awk -v s="$1" -v n="$2" 'BEGIN{printf "%.0f", n/s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "n/a" || b == "n/a" || a == "" || b == "" || b+0 == 0) print "n/a"; else printf "%.2f", a/b }'; }
verdict() { awk -v a="$1" -v t="$2" 'BEGIN{ if (a == "n/a") print "n/a"; else if (a+0 >= t+0) print "MET"; else print "MISSED" }'; }

# ---------------------------------------------------------------- small-file helper (anchors.sh's)
SMALLPY="$REPO/bench/small.py"   # the small-file workload (anchors.sh's)

fio_iops() {  # $1 file $2 invalidate(0/1); run through $WRAP
  $WRAP fio --name=rr --filename="$1" --rw=randread --bs=4k --size="${SIZE_MB}M" --ioengine=psync \
      --runtime="$RAND_SECS" --time_based --invalidate="$2" --norandommap --randrepeat=1 \
      --output-format=json 2>/dev/null |
    "$PY" -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["read"]["iops"])'
}

# ---------------------------------------------------------------- per-fs setup
# Each setup sets M (where the programs read and write) and WRAP (the command prefix they run under).
F=""; KEY=""; TAG=""
TAGFILE=""      # set when `fspf run --tag-file` exists: the run itself reports its final tag
fspf_wrap() {   # refresh WRAP with the current tag
  if [[ $SHIELD_MODE == run ]]; then
    WRAP="$FSPF run --fspf $F --key $KEY --tag $TAG --mutable ${TAGFILE:+--tag-file $TAGFILE} --"
  else
    WRAP="env LD_PRELOAD=$PRELOAD SCONE_FSPF=$F SCONE_FSPF_KEY=$KEY SCONE_FSPF_TAG=$TAG SCONE_FSPF_MUTABLE=1"
  fi
}
after_write() {  # the shield committed: take the new tag (see header comment)
  [[ $1 == fspf ]] || return 0
  if [[ -n $TAGFILE && -s $TAGFILE ]]; then TAG=$(tr -d ' \n' < "$TAGFILE"); else TAG=$("$FSPF" show --tag "$F"); fi
  fspf_wrap
}
setup_plain() { M="$W/plain"; mkdir -p "$M"; WRAP=""; }
setup_gocryptfs() {
  command -v gocryptfs >/dev/null && [[ -e /dev/fuse ]] || return 1
  printf '%s\n' "$PW" > "$W/pw"
  mkdir -p "$W/gc.cipher" "$W/gc.mnt"
  gocryptfs -init -q -scryptn 10 -passfile "$W/pw" "$W/gc.cipher" >/dev/null
  gocryptfs -fg -q -passfile "$W/pw" "$W/gc.cipher" "$W/gc.mnt" >"$W/gocryptfs.log" 2>&1 &
  GPID=$!; GMNT="$W/gc.mnt"; M="$GMNT"; WRAP=""
  local i
  for i in $(seq 100); do mountpoint -q "$M" && return 0; sleep 0.1; done
  return 1
}
teardown_gocryptfs() {
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do fusermount3 -u "$GMNT" 2>/dev/null && break; sleep 1; done
  wait "$GPID" 2>/dev/null || true
  GMNT=""; GPID=""
}
setup_fspf() {
  M="$W/fspf.data"; F="$W/fspf.pb"
  mkdir -p "$M"
  "$FSPF" create "$F" >/dev/null
  "$FSPF" addr "$F" / --kernel / --not-protected >/dev/null
  "$FSPF" addr "$F" "$M" --encrypted --kernel "$M" ${CHUNK_LEN:+--chunk-length "$CHUNK_LEN"} >/dev/null
  local out
  out=$("$FSPF" encrypt "$F")
  TAG=$(awk '{for (i=1;i<NF;i++) if ($i=="tag:") print $(i+1)}' <<<"$out")
  KEY=$(awk '{for (i=1;i<NF;i++) if ($i=="key:") print $(i+1)}' <<<"$out")
  [[ ${#KEY} -eq 64 && ${#TAG} -eq 32 ]] || die "could not parse key/tag from: fspf encrypt"
  if [[ $SHIELD_MODE == run ]] && "$FSPF" run --help 2>/dev/null | grep -q -- '--tag-file'; then
    TAGFILE="$W/run.tag"
  fi
  fspf_wrap
  # Sanity: the shield must be active, or the numbers below would be plaintext numbers.
  printf 'shield-sanity-plaintext\n' > "$W/sanity.txt"
  # dd: plain open/read/write (cp would take copy_file_range, a separate hook to get right)
  $WRAP dd if="$W/sanity.txt" of="$M/sanity.txt" status=none || die "dd under the shield failed"
  after_write fspf
  if grep -q 'shield-sanity-plaintext' "$M/sanity.txt" 2>/dev/null; then
    die "$M/sanity.txt holds plaintext on disk: the shield did not intercept the write"
  fi
  [[ $($WRAP cat "$M/sanity.txt") == shield-sanity-plaintext ]] || die "reading back through the shield failed"
  "$FSPF" cat "$F" "$M/sanity.txt" --key "$KEY" --tag "$TAG" 2>/dev/null | grep -q shield-sanity-plaintext ||
    die "fspf cat of a file written under the shield failed"
}

declare -A R
bench_fs() {
  local fs=$1 t0 t1 i
  local -a w=() rc=() rw=() rcat=() sc=() sr=()
  WRAP=""
  log "$fs: setup"
  "setup_$fs" || { log "$fs: not available, skipping"; return 0; }
  log "$fs: sequential ${SIZE_MB} MiB x $RUNS"
  for ((i=0; i<RUNS; i++)); do
    sync; sleep 0.5
    t0=$(now); $WRAP dd if="$SRC" of="$M/big.$i" bs=1M count="$SIZE_MB" conv=fsync status=none; t1=$(now); w+=("$(el "$t0" "$t1")")
    after_write "$fs"
    cold
    t0=$(now); $WRAP dd if="$M/big.$i" of=/dev/null bs=1M status=none; t1=$(now); rc+=("$(el "$t0" "$t1")")
    t0=$(now); $WRAP dd if="$M/big.$i" of=/dev/null bs=1M status=none; t1=$(now); rw+=("$(el "$t0" "$t1")")
    t0=$(now); $WRAP cat "$M/big.$i" >/dev/null; t1=$(now); rcat+=("$(el "$t0" "$t1")")
  done
  $WRAP cmp -s "$SRC" "$M/big.0" || log "WARNING: $fs read-back differs from source!"
  log "$fs: random 4 KiB reads (${RAND_SECS}s warm)"
  $WRAP cat "$M/big.0" >/dev/null
  R[$fs,rrW]=$(fio_iops "$M/big.0" 0)
  log "$fs: $NFILES small files x $SMALL_RUNS"
  for ((i=0; i<SMALL_RUNS; i++)); do
    sync; sleep 0.5
    t0=$(now); $WRAP "$PY" "$SMALLPY" create "$M/small.$i" "$NFILES" >/dev/null; t1=$(now); sc+=("$(el "$t0" "$t1")")
    after_write "$fs"
    $WRAP "$PY" "$SMALLPY" read "$M/small.$i" "$NFILES" >/dev/null   # warm-up
    t0=$(now); $WRAP "$PY" "$SMALLPY" read "$M/small.$i" "$NFILES" >/dev/null; t1=$(now); sr+=("$(el "$t0" "$t1")")
  done
  R[$fs,seqW]=$(mbps "$(median "${w[@]}")")
  R[$fs,seqRc]=$(mbps "$(median "${rc[@]}")")
  R[$fs,seqRw]=$(mbps "$(median "${rw[@]}")")
  R[$fs,catRw]=$(mbps "$(median "${rcat[@]}")")
  R[$fs,smC]=$(rate "$(median "${sc[@]}")" "$NFILES")
  R[$fs,smR]=$(rate "$(median "${sr[@]}")" "$NFILES")
  R[$fs,ok]=1
  log "$fs: seqW ${w[*]} | seqRc ${rc[*]} | seqRw ${rw[*]} | catRw ${rcat[*]} | smC ${sc[*]} | smR ${sr[*]} (seconds)"
  [[ $fs == gocryptfs ]] && teardown_gocryptfs
  return 0
}

# ---------------------------------------------------------------- run
T_START=$(now)
log "workdir $W on $(findmnt -n -o FSTYPE,SOURCE --target "$W" | head -1 | tr -s ' '); shield mode: $SHIELD_MODE"
log "generating ${SIZE_MB} MiB random source in $SRC"
head -c $((SIZE_MB*1048576)) /dev/urandom > "$SRC"
for fs in $FSLIST; do bench_fs "$fs"; done
T_END=$(now)

# ---------------------------------------------------------------- report
v() { echo "${R[$1,$2]:-n/a}"; }
{
echo
echo "shield.sh  $(date -u +%FT%TZ)  host: $(nproc) cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "fspf $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "(not a git checkout)") ($SHIELD_MODE) | gocryptfs $(gocryptfs -version 2>/dev/null | awk '{print $2}' | tr -d ';') | $(fio --version)"
echo "backing fs: $(findmnt -n -o FSTYPE,SOURCE --target "$BENCH_BASE" | head -1 | tr -s ' ')  size=${SIZE_MB}MiB files=${NFILES} runs=${RUNS}/${SMALL_RUNS} drop_caches=${DROP} fspf chunk=${CHUNK_LEN:-default}"
echo "MB/s = 1e6 B/s; rrW = fio 4 KiB random-read IOPS, warm; small files in files/s; medians"
echo
printf '%-10s | %7s %7s %7s %7s | %8s | %8s %8s\n' fs seqW seqRc seqRw catRw rrW smCreate smRdWarm
printf '%-10s | %7s %7s %7s %7s | %8s | %8s %8s\n' "" MB/s MB/s MB/s MB/s IOPS files/s files/s
echo "-----------+---------------------------------+----------+------------------"
for fs in $FSLIST; do
  if [[ -n ${R[$fs,ok]:-} ]]; then
    printf '%-10s | %7s %7s %7s %7s | %8s | %8s %8s\n' "$fs" "$(v "$fs" seqW)" "$(v "$fs" seqRc)" "$(v "$fs" seqRw)" \
      "$(v "$fs" catRw)" "$(v "$fs" rrW)" "$(v "$fs" smC)" "$(v "$fs" smR)"
  else
    printf '%-10s | %s\n' "$fs" "skipped"
  fi
done
echo "-----------+---------------------------------+----------+------------------"
chk() {  # label value-a value-b target
  local r; r=$(ratio "$2" "$3")
  printf '%-44s %6s x   target >= %-5s %s\n' "$1" "$r" "$4" "$(verdict "$r" "$4")"
}
chk "fspf seq read warm   / gocryptfs"     "$(v fspf seqRw)" "$(v gocryptfs seqRw)" 5
chk "fspf seq read warm   / native"        "$(v fspf seqRw)" "$(v plain seqRw)"     0.35
chk "fspf rand 4 KiB warm / gocryptfs"     "$(v fspf rrW)"   "$(v gocryptfs rrW)"   10
chk "fspf rand 4 KiB warm / native"        "$(v fspf rrW)"   "$(v plain rrW)"       0.40
chk "fspf seq write       / gocryptfs"     "$(v fspf seqW)"  "$(v gocryptfs seqW)"  5
chk "fspf small create    / gocryptfs"     "$(v fspf smC)"   "$(v gocryptfs smC)"   5
chk "fspf small read warm / gocryptfs"     "$(v fspf smR)"   "$(v gocryptfs smR)"   5
printf '%-44s %6s x   (reference: the read path without the stdin fill)\n' "fspf cat read warm   / gocryptfs" "$(ratio "$(v fspf catRw)" "$(v gocryptfs catRw)")"
printf '%-44s %6s x   (reference)\n' "fspf cat read warm   / native" "$(ratio "$(v fspf catRw)" "$(v plain catRw)")"
printf '%-44s %6s x   (seq read cold, for reference)\n' "fspf seq read cold   / gocryptfs" "$(ratio "$(v fspf seqRc)" "$(v gocryptfs seqRc)")"
echo "total runtime: $(awk -v a="$T_START" -v b="$T_END" 'BEGIN{printf "%.0f", b-a}') s"
} | if [[ -n $RESULTS_FILE ]]; then tee "$RESULTS_FILE"; else cat; fi
