#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2059  # sh -c scripts take $1 from their own arguments; FMT is ours
# writes.sh - what writes cost (issue 8, "writes cost what changed"): the in-process shield
# (libfspf_preload.so, `fspf run --mutable`) against native plaintext and gocryptfs, measured in
# the same run with the conventions of bench/shield.sh and /work/shared/bench/anchors.sh.
#
# Usage (as root, from anywhere in the repo):   bash bench/writes.sh
# Quick run:  SIZE_MB=64 DB_MB=20 TXNS=100 RAND_OPS=200 NBIG=2000 NFILES=500 RUNS=1 bash bench/writes.sh
# Knobs (env):  SIZE_MB=1024    size of the append, randw and seqW files (MiB)
#               DB_MB=200       approximate size of the SQLite database (MiB)
#               TXNS=2000       committed single-row UPDATE transactions per sqlite run
#               RAND_OPS=2000   random 4 KiB pwrite + fdatasync per randw run
#               NBIG=50000      files in the large volume of fsync50k (the small one holds 10)
#               FSYNC_REPS=20   write + fsync processes per volume and run in fsync50k
#               NFILES=10000    files created per smC run
#               RUNS=3          runs per workload; every number is the median of RUNS
#               FSLIST="plain gocryptfs fspf"
#               COLUMNS_LIST="append randw sqlite fsync50k seqW smC"   the workloads to run
#               BENCH_BASE=/var/tmp   backing directory of all three file systems (ext4 here)
#               STEP_TIMEOUT=900      seconds any single step (one process tree) may take; a step that
#                                     takes longer is killed and its workload reported as TIMEOUT
#               KEEP_GOING=1          a failed (or timed-out) step marks its workload FAILED (TIMEOUT) for
#                                     that file system and the script goes on, exiting 1 at the end;
#                                     KEEP_GOING=0 stops at the first one
#               RESULTS_FILE=<path>   (also write the final table there)
#               SKIP_BUILD=1          (use target/release as is)
#
# Per file system (plain = a directory on BENCH_BASE, gocryptfs = a fresh gocryptfs mount on it,
# fspf = an encrypted mutable region whose kernel path is a directory on it, every program under
# `fspf run --fspf F --key-file K --tag T --mutable --tag-file TF --`, the new tag taken from TF
# after each mutating step, exactly like shield.sh). Times are wall-clock around whole processes,
# so the shield's start-up and its commit at exit are counted.
#   append   a SIZE_MB file of random bytes exists (written beforehand, untimed, through the shield
#            for fspf); time `/bin/sh -c 'echo line >> FILE'` (dash). Columns: ms; MB written to
#            the block device backing BENCH_BASE between a `sync` before and a `sync` after the step
#            (sectors written in /sys/class/block/DEV/stat; the counter is device-wide, so other
#            writers on the same disk add noise); max RSS (GNU time %M: the largest process of the
#            tree) of a separate, untimed run of the same step. Below the table: the time of
#            `fspf run ... -- /bin/true`, the launcher's floor inside every fspf time
#   randw    RAND_OPS random 4 KiB-aligned pwrite + fdatasync into a SIZE_MB file (a small C
#            program compiled with gcc at start; written beforehand, untimed), ops/s; the last
#            run's blocks are read back and checked afterwards (untimed)
#   sqlite   a ~DB_MB database, table t(id INTEGER PRIMARY KEY, v INTEGER, pad BLOB) with 1000-byte
#            randomblob pads (created beforehand, untimed); time TXNS transactions
#            `BEGIN; UPDATE t SET v=v+1 WHERE id=?; COMMIT` (python3 sqlite3 module run by the real
#            interpreter binary, default rollback journal, synchronous=FULL), transactions/s;
#            sum(v) and PRAGMA quick_check are checked afterwards (untimed)
#   fsync50k FSYNC_REPS processes `/bin/sh -c 'echo x > F && sync F'` (one small write + fsync each)
#            in a volume holding NBIG files and in one holding 10 (separate gocryptfs mounts,
#            separate fspf files; populated beforehand, untimed); ms per process in each and the
#            ratio large/small (~1 for native and gocryptfs)
#   seqW     dd bs=1M conv=fsync of SIZE_MB random bytes (source on /dev/shm) to a new file, MB/s
#   smC      create NFILES files of 1-4 KiB in 10 dirs + os.sync() (shield.sh's smC), files/s
# MB = 1e6 bytes in MB/s, MiB elsewhere. The report has one row per file system, then ratio rows
# fspf/native and fspf/gocryptfs of the raw numbers (for ms and MB lower is better), then the
# issue-8 targets:
#   append   fspf <= 3x native wall time, and <= 64 KiB written beside metadata (checked as
#            fspf MB written - native MB written <= 64 KiB: native's figure is its data + journal)
#   randw    fspf >= 0.40x native ops/s and >= 3x gocryptfs
#   sqlite   fspf >= 0.40x native transactions/s and >= 3x gocryptfs
#   fsync50k fspf per-fsync time in the NBIG-file volume <= 2x the 10-file volume's
#   seqW     fspf >= 0.9x native and >= 5x gocryptfs
#   smC      fspf >= 0.6x native and >= 5x gocryptfs
# A step that fails (a program exits non-zero, under the shield or not, or a read-back check
# fails) or runs over STEP_TIMEOUT never yields a number: its cell says FAILED or TIMEOUT, the log
# says which step and command, and the script exits 1. Expect fspf TIMEOUTs at full size today (the
# format rewrites a whole file per change: randw and sqlite cost a file rewrite per fdatasync).
set -Eeuo pipefail

SIZE_MB=${SIZE_MB:-1024}
DB_MB=${DB_MB:-200}
TXNS=${TXNS:-2000}
RAND_OPS=${RAND_OPS:-2000}
NBIG=${NBIG:-50000}
FSYNC_REPS=${FSYNC_REPS:-20}
NFILES=${NFILES:-10000}
RUNS=${RUNS:-3}
FSLIST=${FSLIST:-"plain gocryptfs fspf"}
COLUMNS_LIST=${COLUMNS_LIST:-"append randw sqlite fsync50k seqW smC"}
BENCH_BASE=${BENCH_BASE:-/var/tmp}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
KEEP_GOING=${KEEP_GOING:-1}
RESULTS_FILE=${RESULTS_FILE:-}
PW="writes-bench-password"   # throwaway password for throwaway gocryptfs volumes

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
[[ $EUID -eq 0 ]] || die "run as root (needs apt-get, /dev/fuse)"
for c in $COLUMNS_LIST; do
  [[ " append randw sqlite fsync50k seqW smC " == *" $c "* ]] || die "unknown workload '$c' in COLUMNS_LIST"
done
for k in SIZE_MB DB_MB TXNS RAND_OPS NBIG FSYNC_REPS NFILES RUNS STEP_TIMEOUT; do
  [[ ${!k} =~ ^[1-9][0-9]*$ ]] || die "$k must be a positive integer (got '${!k}')"
done
want() { [[ " $COLUMNS_LIST " == *" $1 "* ]]; }

FSPF="$REPO/target/release/fspf"
PRELOAD="$REPO/target/release/libfspf_preload.so"

# ---------------------------------------------------------------- install + build
install_missing gocryptfs=gocryptfs fusermount3=fuse3 python3=python3 gcc=gcc mountpoint=util-linux \
  findmnt=util-linux lsblk=util-linux /usr/bin/time=time
command -v python3 >/dev/null || die "python3 required"
command -v gcc >/dev/null || die "gcc required (randw)"
# the real interpreter, not a pyenv shim script (the shim would be shielded too and cost a bash start)
PY=$(realpath "$(python3 -c 'import sys; print(sys.executable)')")
[[ -x $PY ]] || die "cannot resolve the python3 interpreter binary"
"$PY" -c 'import sqlite3' 2>/dev/null || die "$PY has no sqlite3 module"
TIME=/usr/bin/time
[[ -x $TIME ]] || { TIME=""; log "GNU time missing: no RSS column"; }
if [[ " $FSLIST " == *" fspf "* ]]; then
  if [[ -z ${SKIP_BUILD:-} ]]; then
    log "cargo build --release"
    (cd "$REPO" && cargo build --release -q) || die "cargo build --release failed"
  fi
  [[ -x $FSPF ]] || die "$FSPF missing: build with 'cargo build --release'"
  [[ -f $PRELOAD ]] || die "$PRELOAD missing: build with 'cargo build --release' or run with FSLIST=\"plain gocryptfs\""
  "$FSPF" run --help 2>/dev/null | grep -q -- '--tag-file' || die "'fspf run' has no --tag-file"
  "$FSPF" run --help 2>/dev/null | grep -q -- '--key-file' || die "'fspf run' has no --key-file"
fi

# ---------------------------------------------------------------- workspace / cleanup
W=$(mktemp -d "$BENCH_BASE/writes.XXXXXX")
SRC=$(mktemp /dev/shm/writes-src.XXXXXX)
declare -a MOUNTS=() MPIDS=()
killtree() {  # $1 and all its descendants (looked up before $1 is signalled, which reparents them)
  local c kids
  kids=$(ps -o pid= --ppid "$1" 2>/dev/null || true)
  kill -TERM "$1" 2>/dev/null || true
  for c in $kids; do killtree "$c"; done
}
unmount_one() {  # $1 mountpoint, $2 daemon pid (a child of this script)
  local m=$1 p=${2:-} i
  [[ -n $m ]] || return 0
  if mountpoint -q "$m" 2>/dev/null; then
    for i in 1 2 3 4 5 6 7 8 9 10; do fusermount3 -u "$m" 2>/dev/null && break; sleep 1; done
    if mountpoint -q "$m"; then fusermount3 -uz "$m" 2>/dev/null || true; fi
  fi
  if [[ -n $p ]]; then
    for i in $(seq 600); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  fi
}
cleanup() {
  local rc=$? i p
  set +e
  # a step still running (Ctrl-C, TERM): end the children of the shell that started it
  if [[ -s $W/step.pids ]]; then while read -r p; do killtree "$p"; done < "$W/step.pids"; fi
  for i in "${!MOUNTS[@]}"; do unmount_one "${MOUNTS[$i]}" "${MPIDS[$i]}"; done
  if findmnt -rn -o TARGET | grep -q "^$W"; then log "some mount under $W still present; leaving $W"; else rm -rf "$W"; fi
  rm -f "$SRC"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { printf '%s' "$EPOCHREALTIME"; }
el()  { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.6f", b-a}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "n/a"} else if(NR%2){print a[(NR+1)/2]} else {printf "%.6g\n",(a[NR/2]+a[NR/2+1])/2} }'; }
mbps() { awk -v s="$1" -v mb="$2" 'BEGIN{printf "%.0f", mb*1.048576/s}'; }   # MB = 1e6 bytes
rate() { awk -v s="$1" -v n="$2" 'BEGIN{printf "%.0f", n/s}'; }
isnum() { [[ $1 =~ ^[0-9.]+$ ]]; }
ratio() { if isnum "$1" && isnum "$2" && awk -v b="$2" 'BEGIN{exit !(b+0 > 0)}'; then awk -v a="$1" -v b="$2" 'BEGIN{r=a/b; printf (r < 0.095 ? "%.3f" : "%.2f"), r}'; else echo n/a; fi; }
verdict() { isnum "$1" || { echo n/a; return; }; awk -v a="$1" -v t="$2" 'BEGIN{ print (a+0 >= t+0) ? "MET" : "MISSED" }'; }
verdict_le() { isnum "$1" || { echo n/a; return; }; awk -v a="$1" -v t="$2" 'BEGIN{ print (a+0 <= t+0) ? "MET" : "MISSED" }'; }

# ---------------------------------------------------------------- block device behind BENCH_BASE
DEVSTAT=""
find_devstat() {
  local src name mm
  src=$(findmnt -no SOURCE --target "$BENCH_BASE" | head -1)
  src=${src%%\[*}   # btrfs subvolume suffix
  if [[ $src == /dev/* && -b $src ]]; then
    name=$(lsblk -ndo KNAME "$(realpath "$src")" 2>/dev/null | head -1)
    [[ -n $name && -r /sys/class/block/$name/stat ]] && { DEVSTAT=/sys/class/block/$name/stat; return; }
  fi
  mm=$(findmnt -no MAJ:MIN --target "$BENCH_BASE" | head -1)
  [[ -n $mm && -r /sys/dev/block/$mm/stat ]] && { DEVSTAT=/sys/dev/block/$mm/stat; return; }
  log "no block device found behind $BENCH_BASE (source '$src'): no MB-written column"
}
sectors_written() { awk '{print $7}' "$DEVSTAT"; }

# ---------------------------------------------------------------- helpers written at start
SMALLPY="$REPO/bench/small.py"   # the small-file workload (anchors.sh's)

SQLPY="$W/sq.py"
cat > "$SQLPY" <<'EOF'
import random, sqlite3, sys
mode, db = sys.argv[1], sys.argv[2]
if mode == "create":                      # sq.py create DB ROWS
    rows = int(sys.argv[3])
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER, pad BLOB)")
    c.execute("BEGIN")
    c.execute("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM r WHERE i < ?) "
              "INSERT INTO t(id, v, pad) SELECT i, 0, randomblob(1000) FROM r", (rows,))
    c.execute("COMMIT")
    c.close()
elif mode == "update":                    # sq.py update DB TXNS SEED
    n, seed = int(sys.argv[3]), int(sys.argv[4])
    c = sqlite3.connect(db, isolation_level=None)
    rows = c.execute("SELECT max(id) FROM t").fetchone()[0]
    rng = random.Random(seed)
    for _ in range(n):
        c.execute("BEGIN")
        cur = c.execute("UPDATE t SET v=v+1 WHERE id=?", (rng.randint(1, rows),))
        if cur.rowcount != 1:
            sys.exit("UPDATE changed %d rows" % cur.rowcount)
        c.execute("COMMIT")
    c.close()
elif mode == "check":                     # sq.py check DB EXPECTED_SUM
    c = sqlite3.connect(db)
    jm = c.execute("PRAGMA journal_mode").fetchone()[0]
    got = c.execute("SELECT sum(v) FROM t").fetchone()[0]
    qc = c.execute("PRAGMA quick_check").fetchone()[0]
    n = c.execute("SELECT count(*) FROM t").fetchone()[0]
    if got != int(sys.argv[3]) or qc != "ok":
        sys.exit("check failed: sum(v)=%r (expected %s), quick_check=%r" % (got, sys.argv[3], qc))
    print("rows=%d sum(v)=%d journal_mode=%s quick_check=%s" % (n, got, jm, qc))
EOF

RANDW="$W/randw"
cat > "$W/randw.c" <<'EOF'
/* randw write|verify FILE NOPS SEED: NOPS random 4 KiB-aligned pwrite + fdatasync (write), or read
   back the final content of every block the same NOPS writes touched (verify). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
static void fill(unsigned char *b, uint64_t seed, long i) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ULL + (uint64_t)i * 0xBF58476D1CE4E5B9ULL + 1;
  for (int k = 0; k < 4096; k += 8) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; memcpy(b + k, &x, 8); }
}
int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: randw write|verify FILE NOPS SEED\n"); return 2; }
  int wr = strcmp(argv[1], "write") == 0;
  long n = atol(argv[3]);
  uint64_t seed = strtoull(argv[4], 0, 10), s = seed * 2654435761ULL + 88172645463325252ULL;
  int fd = open(argv[2], wr ? O_RDWR : O_RDONLY);
  if (fd < 0) { perror("open"); return 1; }
  struct stat st;
  if (fstat(fd, &st) != 0) { perror("fstat"); return 1; }
  long nb = st.st_size / 4096;
  if (nb < 1) { fprintf(stderr, "randw: %s is smaller than 4 KiB\n", argv[2]); return 1; }
  long *blk = malloc(n * sizeof *blk);
  unsigned char *seen = calloc(nb, 1), buf[4096], got[4096];
  if (!blk || !seen) { perror("malloc"); return 1; }
  for (long i = 0; i < n; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; blk[i] = (long)(s % (uint64_t)nb); }
  if (wr) {
    for (long i = 0; i < n; i++) {
      fill(buf, seed, i);
      if (pwrite(fd, buf, 4096, (off_t)blk[i] * 4096) != 4096) { perror("pwrite"); return 1; }
      if (fdatasync(fd) != 0) { perror("fdatasync"); return 1; }
    }
  } else {
    for (long i = n - 1; i >= 0; i--) {      /* the last write of a block is its content */
      if (seen[blk[i]]) continue;
      seen[blk[i]] = 1;
      fill(buf, seed, i);
      if (pread(fd, got, 4096, (off_t)blk[i] * 4096) != 4096) { perror("pread"); return 1; }
      if (memcmp(buf, got, 4096) != 0) { fprintf(stderr, "randw: block %ld differs (write %ld)\n", blk[i], i); return 1; }
    }
  }
  if (close(fd) != 0) { perror("close"); return 1; }
  return 0;
}
EOF
gcc -O2 -Wall -o "$RANDW" "$W/randw.c" || die "gcc randw.c failed"

# ---------------------------------------------------------------- steps
# step LABEL CMD...: run CMD as one process tree, wall-clock time in STEP_SECS. A non-zero exit
# fails the workload (exit 1 of the workload's subshell, or of the script outside one); a step
# still running after STEP_TIMEOUT s is killed and fails it the same way (exit 3: TIMEOUT).
# The watchdog is forked before the clock starts and signals the shell, whose `wait` it interrupts.
STEP_SECS=""; CUR="setup"
step() {
  local label=$1 me=$BASHPID wd pid rc=0 t0 t1
  shift
  STEP_ALARM=0
  trap 'STEP_ALARM=1' USR1
  ( sleep "$STEP_TIMEOUT" && kill -USR1 "$me" ) 2>/dev/null &
  wd=$!
  disown "$wd"   # no job notice when it is ended below
  echo "$wd" > "$W/step.pids"   # for cleanup (Ctrl-C, TERM): the process trees of this step
  t0=$EPOCHREALTIME
  "$@" &
  pid=$!
  echo "$pid" >> "$W/step.pids"
  wait "$pid" || rc=$?
  t1=$EPOCHREALTIME
  if ((STEP_ALARM)) && kill -0 "$pid" 2>/dev/null; then
    killtree "$pid"; wait "$pid" 2>/dev/null || true
    killtree "$wd"; rm -f "$W/step.pids"
    log "TIMEOUT: $CUR: step '$label' still running after STEP_TIMEOUT=${STEP_TIMEOUT}s: killed, no number for $CUR. Command: $*"
    exit 3
  fi
  killtree "$wd"
  rm -f "$W/step.pids"
  if ((rc != 0)); then
    log "FAILED: $CUR: step '$label' exited $rc. Command: $*"
    exit 1
  fi
  STEP_SECS=$(el "$t0" "$t1")
}
check() {  # check LABEL CMD...: like step, untimed, for read-back checks
  step "$@"
}

# ---------------------------------------------------------------- volumes
# A volume is a directory the programs write to, plus (fspf) its own fspf file, key and tag file.
# vdir FS VOL prints the directory; wrap FS VOL sets the array WR, the prefix programs run under.
vdir() {
  case $1 in
    plain) echo "$W/plain.$2" ;;
    gocryptfs) echo "$W/gc.$2.mnt" ;;
    fspf) echo "$W/fspf.$2.data" ;;
  esac
}
fspf_tag() {  # the volume's current tag: the last run's --tag-file (one tag once the run ended)
  local t
  read -ra t < "$W/fspf.$1.tag" || true
  if ((${#t[@]} == 1)) && [[ ${#t[0]} -eq 32 ]]; then echo "${t[0]}"; else "$FSPF" show --tag "$W/fspf.$1.pb"; fi
}
wrap() {
  WR=()
  if [[ $1 == fspf ]]; then
    WR=("$FSPF" run --fspf "$W/fspf.$2.pb" --key-file "$W/fspf.$2.key" --tag "$(fspf_tag "$2")"
        --mutable --tag-file "$W/fspf.$2.tag" --)
  fi
}
setup_vol() {  # FS VOL
  local fs=$1 v=$2 M i out key tag
  M=$(vdir "$fs" "$v")
  case $fs in
    plain) mkdir -p "$M" ;;
    gocryptfs)
      command -v gocryptfs >/dev/null && [[ -e /dev/fuse ]] || return 1
      [[ -f $W/pw ]] || printf '%s\n' "$PW" > "$W/pw"
      mkdir -p "$W/gc.$v.cipher" "$M"
      gocryptfs -init -q -scryptn 10 -passfile "$W/pw" "$W/gc.$v.cipher" >/dev/null
      gocryptfs -fg -q -passfile "$W/pw" "$W/gc.$v.cipher" "$M" >"$W/gocryptfs.$v.log" 2>&1 &
      MOUNTS+=("$M"); MPIDS+=("$!")
      for i in $(seq 100); do mountpoint -q "$M" && return 0; sleep 0.1; done
      log "gocryptfs mount of $M failed:"; tail -5 "$W/gocryptfs.$v.log" >&2
      return 1 ;;
    fspf)
      local F="$W/fspf.$v.pb"
      mkdir -p "$M"
      "$FSPF" create "$F" >/dev/null
      "$FSPF" addr "$F" / --kernel / --not-protected >/dev/null
      "$FSPF" addr "$F" "$M" --encrypted --kernel "$M" >/dev/null
      out=$("$FSPF" encrypt "$F")
      tag=$(awk '{for (i=1;i<NF;i++) if ($i=="tag:") print $(i+1)}' <<<"$out")
      key=$(awk '{for (i=1;i<NF;i++) if ($i=="key:") print $(i+1)}' <<<"$out")
      [[ ${#key} -eq 64 && ${#tag} -eq 32 ]] || die "could not parse key/tag from: fspf encrypt"
      (umask 077; printf '%s\n' "$key" > "$W/fspf.$v.key")
      printf '%s\n' "$tag" > "$W/fspf.$v.tag"
      # Sanity: the shield must be active, or the numbers below would be plaintext numbers.
      printf 'shield-sanity-plaintext\n' > "$W/sanity.txt"
      wrap fspf "$v"
      CUR="fspf setup of volume $v"
      step sanity-write "${WR[@]}" dd if="$W/sanity.txt" of="$M/sanity.txt" status=none
      if grep -q 'shield-sanity-plaintext' "$M/sanity.txt" 2>/dev/null; then
        die "$M/sanity.txt holds plaintext on disk: the shield did not intercept the write"
      fi
      wrap fspf "$v"
      [[ $("${WR[@]}" cat "$M/sanity.txt") == shield-sanity-plaintext ]] || die "reading back through the shield failed"
      "$FSPF" cat "$F" "$M/sanity.txt" --key-file "$W/fspf.$v.key" --tag "$(fspf_tag "$v")" 2>/dev/null |
        grep -q shield-sanity-plaintext || die "fspf cat of a file written under the shield failed" ;;
  esac
}
teardown_fs() {  # unmount FS's gocryptfs volumes, delete all of FS's data
  local fs=$1 i
  if [[ $fs == gocryptfs ]]; then
    for i in "${!MOUNTS[@]}"; do unmount_one "${MOUNTS[$i]}" "${MPIDS[$i]}"; MOUNTS[i]=""; MPIDS[i]=""; done
    findmnt -rn -o TARGET | grep -q "^$W/gc\." && { log "gocryptfs still mounted under $W; keeping its data"; return 0; }
    rm -rf "$W"/gc.*
  else
    rm -rf "$W/$fs".*
  fi
}

# ---------------------------------------------------------------- workloads
# Each runs in a subshell (so that a failure ends only that workload) and reports its numbers as
# "FS KEY VALUE" lines on fd 3 (the results file).
res() { echo "$1 $2 $3" >&3; }

w_append() {
  local fs=$1 M f i s0 s1 expect
  local -a t=() wb=() rs=() fl=()
  M=$(vdir "$fs" main); f="$M/append.dat"
  wrap "$fs" main
  step create "${WR[@]}" dd if="$SRC" of="$f" bs=1M count="$SIZE_MB" conv=fsync status=none
  for ((i=0; i<RUNS; i++)); do
    wrap "$fs" main
    sync; sleep 0.5
    [[ -n $DEVSTAT ]] && s0=$(sectors_written)
    step append "${WR[@]}" /bin/sh -c 'echo line >> "$1"' sh "$f"
    t+=("$STEP_SECS")
    if [[ -n $DEVSTAT ]]; then sync; s1=$(sectors_written); wb+=("$(awk -v a="$s0" -v b="$s1" 'BEGIN{printf "%.3f", (b-a)*512/1048576}')"); fi
    if [[ -n $TIME ]]; then
      wrap "$fs" main
      rm -f "$W/rss"
      step append-rss "$TIME" -f %M -o "$W/rss" "${WR[@]}" /bin/sh -c 'echo line >> "$1"' sh "$f"
      rs+=("$(awk '{printf "%.1f", $1/1024}' "$W/rss")")
    fi
    if [[ $fs == fspf ]]; then   # the launcher's floor, part of every fspf number: /bin/true
      wrap "$fs" main
      step floor "${WR[@]}" /bin/true
      fl+=("$STEP_SECS")
    fi
  done
  # read back: size and tail through the shield
  wrap "$fs" main
  expect=$(( SIZE_MB*1048576 + 5*RUNS*(1 + (${#rs[@]} > 0)) ))
  check readback "${WR[@]}" /bin/sh -c '[ "$(wc -c < "$1")" -eq "$2" ] && [ "$(tail -c 5 "$1")" = line ] || { echo "append read-back: $(wc -c < "$1") bytes, expected $2; tail: $(tail -c 5 "$1" | od -c | head -1)" >&2; exit 1; }' sh "$f" "$expect"
  res "$fs" appMs "$(awk -v s="$(median "${t[@]}")" 'BEGIN{printf "%.1f", s*1000}')"
  ((${#wb[@]})) && res "$fs" appMB "$(median "${wb[@]}")"
  ((${#rs[@]})) && res "$fs" appRSS "$(median "${rs[@]}")"
  ((${#fl[@]})) && res "$fs" floor "$(awk -v s="$(median "${fl[@]}")" 'BEGIN{printf "%.1f", s*1000}')"
  log "$fs append: ${t[*]} s | written ${wb[*]:-n/a} MiB | max RSS ${rs[*]:-n/a} MiB"
}

w_randw() {
  local fs=$1 M f i
  local -a t=()
  M=$(vdir "$fs" main); f="$M/randw.dat"
  wrap "$fs" main
  step create "${WR[@]}" dd if="$SRC" of="$f" bs=1M count="$SIZE_MB" conv=fsync status=none
  for ((i=0; i<RUNS; i++)); do
    wrap "$fs" main
    sync; sleep 0.5
    step randw "${WR[@]}" "$RANDW" write "$f" "$RAND_OPS" "$((i+1))"
    t+=("$STEP_SECS")
  done
  wrap "$fs" main
  check verify "${WR[@]}" "$RANDW" verify "$f" "$RAND_OPS" "$RUNS"
  res "$fs" randw "$(rate "$(median "${t[@]}")" "$RAND_OPS")"
  log "$fs randw: ${t[*]} s for $RAND_OPS ops"
}

w_sqlite() {
  local fs=$1 M db i out
  local -a t=()
  M=$(vdir "$fs" main); db="$M/bench.db"
  wrap "$fs" main
  step create "${WR[@]}" "$PY" "$SQLPY" create "$db" "$((DB_MB*1000))"
  log "$fs sqlite: database $(du -m "$db" | cut -f1) MiB on disk"
  for ((i=0; i<RUNS; i++)); do
    wrap "$fs" main
    sync; sleep 0.5
    step update "${WR[@]}" "$PY" "$SQLPY" update "$db" "$TXNS" "$((i+1))"
    t+=("$STEP_SECS")
  done
  wrap "$fs" main
  check check "${WR[@]}" "$PY" "$SQLPY" check "$db" "$((RUNS*TXNS))" > "$W/sq.out"
  res "$fs" sqlite "$(rate "$(median "${t[@]}")" "$TXNS")"
  log "$fs sqlite: ${t[*]} s for $TXNS txns; $(cat "$W/sq.out")"
}

w_fsync50k() {
  local fs=$1 v M i r tot
  local -a big=() small=()
  for v in big small; do
    M=$(vdir "$fs" "$v")
    wrap "$fs" "$v"
    step populate "${WR[@]}" "$PY" "$SMALLPY" create "$M/pop" "$([[ $v == big ]] && echo "$NBIG" || echo 10)" >/dev/null
  done
  for ((r=0; r<RUNS; r++)); do
    for v in big small; do
      M=$(vdir "$fs" "$v")
      sync; sleep 0.5
      tot=0
      for ((i=0; i<FSYNC_REPS; i++)); do
        wrap "$fs" "$v"
        step "fsync-$v" "${WR[@]}" /bin/sh -c 'echo x > "$1" && sync "$1"' sh "$M/fsync.txt"
        tot=$(awk -v a="$tot" -v b="$STEP_SECS" 'BEGIN{printf "%.6f", a+b}')
      done
      if [[ $v == big ]]; then big+=("$tot"); else small+=("$tot"); fi
    done
  done
  wrap "$fs" big
  check readback "${WR[@]}" /bin/sh -c '[ "$(cat "$1")" = x ]' sh "$(vdir "$fs" big)/fsync.txt"
  res "$fs" fsBig "$(awk -v s="$(median "${big[@]}")" -v n="$FSYNC_REPS" 'BEGIN{printf "%.2f", s*1000/n}')"
  res "$fs" fsSmall "$(awk -v s="$(median "${small[@]}")" -v n="$FSYNC_REPS" 'BEGIN{printf "%.2f", s*1000/n}')"
  log "$fs fsync50k: $FSYNC_REPS processes take ${big[*]} s ($NBIG files) | ${small[*]} s (10 files)"
}

w_seqW() {
  local fs=$1 M i
  local -a t=()
  M=$(vdir "$fs" main)
  for ((i=0; i<RUNS; i++)); do
    wrap "$fs" main
    sync; sleep 0.5
    step seqW "${WR[@]}" dd if="$SRC" of="$M/seqw.$i" bs=1M count="$SIZE_MB" conv=fsync status=none
    t+=("$STEP_SECS")
  done
  wrap "$fs" main
  check readback "${WR[@]}" cmp "$SRC" "$M/seqw.0"
  res "$fs" seqW "$(mbps "$(median "${t[@]}")" "$SIZE_MB")"
  log "$fs seqW: ${t[*]} s"
}

w_smC() {
  local fs=$1 M i
  local -a t=()
  M=$(vdir "$fs" main)
  for ((i=0; i<RUNS; i++)); do
    wrap "$fs" main
    sync; sleep 0.5
    step create "${WR[@]}" "$PY" "$SMALLPY" create "$M/small.$i" "$NFILES" >/dev/null
    t+=("$STEP_SECS")
  done
  wrap "$fs" main
  check readback "${WR[@]}" "$PY" "$SMALLPY" read "$M/small.0" "$NFILES" >/dev/null
  res "$fs" smC "$(rate "$(median "${t[@]}")" "$NFILES")"
  log "$fs smC: ${t[*]} s for $NFILES files"
}

declare -A R
FAILED=0
bench_fs() {
  local fs=$1 col rc v
  local -a vols=()
  log "$fs: setup"
  for col in append randw sqlite seqW smC; do want "$col" && { vols+=(main); break; }; done
  want fsync50k && vols+=(big small)
  for v in "${vols[@]}"; do
    CUR="$fs setup"
    setup_vol "$fs" "$v" || { log "$fs: not available, skipping"; teardown_fs "$fs"; return 0; }
  done
  R[$fs,ok]=1
  for col in $COLUMNS_LIST; do
    log "$fs: $col"
    rc=0
    ( CUR="$fs $col"; "w_$col" "$fs" ) 3>>"$W/results" || rc=$?
    if ((rc != 0)); then
      R[$fs,$col,failed]=FAILED; ((rc == 3)) && R[$fs,$col,failed]=TIMEOUT
      FAILED=1
      ((KEEP_GOING)) || die "$fs $col: ${R[$fs,$col,failed]} (KEEP_GOING=0: stopping)"
      log "$fs $col: ${R[$fs,$col,failed]} (exit $rc): no number for it; going on (KEEP_GOING=1)"
    fi
  done
  teardown_fs "$fs"
}

# ---------------------------------------------------------------- run
T_START=$(now)
find_devstat
log "workdir $W on $(findmnt -n -o FSTYPE,SOURCE --target "$W" | head -1 | tr -s ' ')${DEVSTAT:+, device counter $DEVSTAT}; python $PY"
if want append || want randw || want seqW; then
  log "generating ${SIZE_MB} MiB random source in $SRC"
  head -c $((SIZE_MB*1048576)) /dev/urandom > "$SRC"
fi
: > "$W/results"
for fs in $FSLIST; do bench_fs "$fs"; done
while read -r fs k val; do R[$fs,$k]=$val; done < "$W/results"
for fs in $FSLIST; do
  if isnum "${R[$fs,fsBig]:-}"; then R[$fs,fsRatio]=$(ratio "${R[$fs,fsBig]}" "${R[$fs,fsSmall]}"); fi
done
T_END=$(now)

# ---------------------------------------------------------------- report
KEYS=(appMs appMB appRSS randw sqlite fsBig fsSmall fsRatio seqW smC)
declare -A COL_OF=( [appMs]=append [appMB]=append [appRSS]=append [randw]=randw [sqlite]=sqlite
                    [fsBig]=fsync50k [fsSmall]=fsync50k [fsRatio]=fsync50k [seqW]=seqW [smC]=smC )
cell() {  # FS KEY
  if [[ -n ${R[$1,${COL_OF[$2]},failed]:-} ]]; then echo "${R[$1,${COL_OF[$2]},failed]}"
  elif ! want "${COL_OF[$2]}"; then echo -
  else echo "${R[$1,$2]:-n/a}"; fi
}
v() { local c; c=$(cell "$1" "$2"); isnum "$c" && echo "$c" || echo n/a; }
FMT='%-16s | %7s %7s %7s | %8s | %8s | %8s %8s %7s | %7s | %8s\n'
{
echo
echo "writes.sh  $(date -u +%FT%TZ)  host: $(nproc) cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "fspf $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "(not a git checkout)") | gocryptfs $(gocryptfs -version 2>/dev/null | awk '{print $2}' | tr -d ';') | sqlite $("$PY" -c 'import sqlite3; print(sqlite3.sqlite_version)') | python $PY"
echo "backing fs: $(findmnt -n -o FSTYPE,SOURCE --target "$BENCH_BASE" | head -1 | tr -s ' ')  size=${SIZE_MB}MiB db=${DB_MB}MiB txns=${TXNS} rand_ops=${RAND_OPS} nbig=${NBIG} fsync_reps=${FSYNC_REPS} files=${NFILES} runs=${RUNS}"
echo "medians of ${RUNS}; MB/s = 1e6 B/s; appMB = MiB written to ${DEVSTAT:-(no device)} (device-wide counter); RSS = GNU time %M"
echo
printf "$FMT" fs append appWr appRSS randw sqlite fsync50k fsync10 big/10 seqW smC
printf "$FMT" "" ms MiB MiB ops/s txn/s ms/op ms/op ratio MB/s files/s
SEP="-----------------+-------------------------+----------+----------+----------------------------+---------+---------"
echo "$SEP"
for fs in $FSLIST; do
  if [[ -n ${R[$fs,ok]:-} ]]; then
    row=(); for k in "${KEYS[@]}"; do row+=("$(cell "$fs" "$k")"); done
    printf "$FMT" "$fs" "${row[@]}"
  else
    printf '%-16s | %s\n' "$fs" "skipped (not available)"
  fi
done
echo "$SEP"
for other in plain gocryptfs; do
  [[ -n ${R[fspf,ok]:-} && -n ${R[$other,ok]:-} ]] || continue
  row=(); for k in "${KEYS[@]}"; do row+=("$(ratio "$(v fspf "$k")" "$(v "$other" "$k")")"); done
  printf "$FMT" "fspf/${other/plain/native}" "${row[@]}"
done
echo "$SEP"
echo "issue-8 targets (ratios of the numbers above; for append lower is better):"
chk() {  # label ratio op target
  printf '%-46s %8s   target %s %-6s %s\n' "$1" "$2" "$3" "$4" "$(if [[ $3 == '<=' ]]; then verdict_le "$2" "$4"; else verdict "$2" "$4"; fi)"
}
chk "append wall time    fspf / native"        "$(ratio "$(v fspf appMs)" "$(v plain appMs)")" '<=' 3
apx=n/a; isnum "$(v fspf appMB)" && isnum "$(v plain appMB)" &&
  apx=$(awk -v a="$(v fspf appMB)" -v b="$(v plain appMB)" 'BEGIN{printf "%.1f", (a-b)*1024}')
[[ $apx == -* ]] && apx=0.0
chk "append KiB written  fspf - native"        "$apx" '<=' 64
chk "randw ops/s         fspf / native"        "$(ratio "$(v fspf randw)" "$(v plain randw)")" '>=' 0.40
chk "randw ops/s         fspf / gocryptfs"     "$(ratio "$(v fspf randw)" "$(v gocryptfs randw)")" '>=' 3
chk "sqlite txn/s        fspf / native"        "$(ratio "$(v fspf sqlite)" "$(v plain sqlite)")" '>=' 0.40
chk "sqlite txn/s        fspf / gocryptfs"     "$(ratio "$(v fspf sqlite)" "$(v gocryptfs sqlite)")" '>=' 3
chk "fsync, ${NBIG}-file / 10-file volume, fspf" "$(v fspf fsRatio)" '<=' 2
chk "seqW MB/s           fspf / native"        "$(ratio "$(v fspf seqW)" "$(v plain seqW)")" '>=' 0.9
chk "seqW MB/s           fspf / gocryptfs"     "$(ratio "$(v fspf seqW)" "$(v gocryptfs seqW)")" '>=' 5
chk "smC files/s         fspf / native"        "$(ratio "$(v fspf smC)" "$(v plain smC)")" '>=' 0.6
chk "smC files/s         fspf / gocryptfs"     "$(ratio "$(v fspf smC)" "$(v gocryptfs smC)")" '>=' 5
[[ -n ${R[fspf,floor]:-} ]] &&
  echo "fspf run -- /bin/true (the launcher's floor, inside every fspf time above): ${R[fspf,floor]} ms"
((FAILED)) && echo "SOME WORKLOADS FAILED: cells FAILED (a step exited non-zero or a check failed) or TIMEOUT (a step ran over STEP_TIMEOUT=${STEP_TIMEOUT}s); see the log"
echo "total runtime: $(awk -v a="$T_START" -v b="$T_END" 'BEGIN{printf "%.0f", b-a}') s"
} | if [[ -n $RESULTS_FILE ]]; then tee "$RESULTS_FILE"; else cat; fi
((FAILED == 0)) || exit 1
