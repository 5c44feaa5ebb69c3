#!/usr/bin/env bash
# fuse.sh - the FUSE shield (`fspf mount`) beside the plain backing directory, gocryptfs and the
# in-process shield (`fspf run`), in one run, on one machine (issue "FUSE shield").
#
# Usage (as root, from anywhere in the repo):   bash bench/fuse.sh
# Knobs (env):  SIZE_MB=1024 NFILES=10000 RUNS=3 RAND_SECS=5 TXNS=100 BENCH_BASE=/var/tmp
#               FSLIST="plain gocryptfs fspf-mount fspf-run" SKIP_BUILD=1
#
# Columns (medians of RUNS):
#   seqW    dd bs=1M count=SIZE_MB conv=fsync of random bytes (from /dev/shm), MB/s
#   seqRc   dd read of it after sync + drop_caches, MB/s
#   seqRw   the same read again (warm), MB/s
#   rrW     fio psync 4 KiB random reads for RAND_SECS, warm, IOPS
#   smC     NFILES files of 1-4 KiB in 10 directories + sync, files/s
#   smR     read them all back (warm), files/s
#   sqlite  TXNS single-row UPDATE transactions (sqlite3, one process) on a 20 MB database, txn/s
# The in-process shield runs every command under `fspf run --mutable` (its start is counted).
set -Eeuo pipefail
SIZE_MB=${SIZE_MB:-1024}
NFILES=${NFILES:-10000}
RUNS=${RUNS:-3}
RAND_SECS=${RAND_SECS:-5}
TXNS=${TXNS:-100}
BENCH_BASE=${BENCH_BASE:-/var/tmp}
FSLIST=${FSLIST:-"plain gocryptfs fspf-mount fspf-run"}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
[[ $EUID -eq 0 ]] || { log "run as root (drop_caches, apt-get)"; exit 1; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FSPF="$REPO/target/release/fspf"
export FSPF_PRELOAD="$REPO/target/release/libfspf_preload.so"
if [[ -z ${SKIP_BUILD:-} ]]; then
  (cd "$REPO" && cargo build --release -q -p fspf -p fspf-preload)
fi
need=()
for c in gocryptfs:gocryptfs fio:fio sqlite3:sqlite3 fusermount3:fuse3; do
  command -v "${c%%:*}" >/dev/null 2>&1 || need+=("${c#*:}")
done
if ((${#need[@]})); then
  log "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get -qq update || true
  DEBIAN_FRONTEND=noninteractive apt-get -y -qq install "${need[@]}" >/dev/null
fi
W=$(mktemp -d "$BENCH_BASE/fspf-fusebench.XXXXXX")
SHM=$(mktemp -d /dev/shm/fspf-fusebench.XXXXXX)
cleanup() {
  for m in "$W"/*/mnt; do mountpoint -q "$m" 2>/dev/null && fusermount3 -u "$m" 2>/dev/null || true; done
  rm -rf "$W" "$SHM"
}
trap cleanup EXIT
head -c "$((SIZE_MB << 20))" /dev/urandom > "$SHM/big"
python3 - "$SHM/small" "$NFILES" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
random.seed(1)
for i in range(n):
    d = f"{root}/d{i % 10}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i}", "wb") as f:
        f.write(os.urandom(random.randint(1024, 4096)))
PY
sqlite3 "$SHM/db" "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i < 200000) INSERT INTO t SELECT i, hex(randomblob(40)) FROM c;"

# median of the arguments
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# setup_<fs> DIR -> sets D (where files go) and WRAP (command prefix)
setup_plain() { D="$1/data"; mkdir -p "$D"; WRAP=(); }
setup_gocryptfs() {
  mkdir -p "$1/cipher" "$1/mnt"
  gocryptfs -q -init -extpass "echo bench-pw" "$1/cipher" >/dev/null
  gocryptfs -q -extpass "echo bench-pw" "$1/cipher" "$1/mnt"
  D="$1/mnt"; WRAP=()
}
new_fspf() { # DIR -> fspf with /enc encrypted at DIR/vol; KEY file, TAG var
  mkdir -p "$1/vol"
  "$FSPF" create "$1/fspf.pb" >/dev/null
  "$FSPF" addr "$1/fspf.pb" / --kernel / --not-protected >/dev/null
  "$FSPF" addr "$1/fspf.pb" /enc --encrypted --kernel "$1/vol" >/dev/null
  "$FSPF" encrypt "$1/fspf.pb" > "$1/keytag"
  TAG=$(awk '{print $9}' "$1/keytag")
}
setup_fspf-mount() {
  new_fspf "$1"; mkdir -p "$1/mnt"
  "$FSPF" mount "$1/fspf.pb" "$1/mnt" --key-file "$1/keytag" --tag "$TAG" --mutable >/dev/null
  D="$1/mnt/enc"; WRAP=()
}
setup_fspf-run() {
  new_fspf "$1"
  # Each command below commits; the next one starts from the tag file.
  printf '%s\n' "$TAG" > "$1/tag"
  D=/enc; WRAP=(fspf_run "$1")
}
fspf_run() { local dir=$1; shift
  "$FSPF" run --fspf "$dir/fspf.pb" --key-file "$dir/keytag" --tag "$(tail -1 "$dir/tag")" --mutable --tag-file "$dir/tag" -- "$@"; }
teardown() { mountpoint -q "$1/mnt" 2>/dev/null && { if [[ $2 == fspf-mount ]]; then "$FSPF" umount "$1/mnt" >/dev/null; else fusermount3 -u "$1/mnt"; fi; } || true; }

rate() { awk -v n="$1" -v t="$2" 'BEGIN {printf "%.1f", n / (t / 1e9)}'; }
declare -A R
for fs in $FSLIST; do
  for ((r = 0; r < RUNS; r++)); do
    dir="$W/$fs-$r"; mkdir -p "$dir"
    "setup_$fs" "$dir"
    log "$fs run $r"
    s=$(now); "${WRAP[@]}" dd if="$SHM/big" of="$D/big" bs=1M conv=fsync status=none; e=$(now)
    R[$fs,seqW,$r]=$(rate "$SIZE_MB" $((e - s)))
    drop; sleep 1
    s=$(now); "${WRAP[@]}" dd if="$D/big" of=/dev/null bs=1M status=none; e=$(now)
    R[$fs,seqRc,$r]=$(rate "$SIZE_MB" $((e - s)))
    s=$(now); "${WRAP[@]}" dd if="$D/big" of=/dev/null bs=1M status=none; e=$(now)
    R[$fs,seqRw,$r]=$(rate "$SIZE_MB" $((e - s)))
    R[$fs,rrW,$r]=$("${WRAP[@]}" fio --name=rr --filename="$D/big" --rw=randread --bs=4k --ioengine=psync \
      --runtime="$RAND_SECS" --time_based --readonly --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{print $8}')
    s=$(now); "${WRAP[@]}" sh -c 'cp -r "$1" "$2/small" && sync' sh "$SHM/small" "$D"; e=$(now)
    R[$fs,smC,$r]=$(rate "$NFILES" $((e - s)))
    s=$(now); "${WRAP[@]}" sh -c 'cat "$1"/small/*/* > /dev/null' sh "$D"; e=$(now)
    R[$fs,smR,$r]=$(rate "$NFILES" $((e - s)))
    cp "$SHM/db" "$SHM/db-$fs"
    "${WRAP[@]}" cp "$SHM/db-$fs" "$D/db"
    rm -f "$SHM/db-$fs"
    sql=$(for ((i = 1; i <= TXNS; i++)); do echo "BEGIN; UPDATE t SET v = hex(randomblob(40)) WHERE id = $((i * 997 % 200000 + 1)); COMMIT;"; done)
    s=$(now); "${WRAP[@]}" sqlite3 "$D/db" "$sql"; e=$(now)
    R[$fs,sqlite,$r]=$(rate "$TXNS" $((e - s)))
    teardown "$dir" "$fs"
    # (Removed at the end, with $W: this machine's ext4 has no journal, and for 30 s after a
    # file is removed it skips the freed inode numbers one by one when it allocates new ones,
    # which slowed the next run's small-file creates by up to 3x.)
  done
done
cols="seqW seqRc seqRw rrW smC smR sqlite"
printf '%-11s' fs; for c in $cols; do printf '%10s' "$c"; done; echo
for fs in $FSLIST; do
  printf '%-11s' "$fs"
  for c in $cols; do v=(); for ((r = 0; r < RUNS; r++)); do v+=("${R[$fs,$c,$r]}"); done; printf '%10s' "$(med "${v[@]}")"; done; echo
done
echo "(MB/s, IOPS, files/s, txn/s; higher is better; SIZE_MB=$SIZE_MB NFILES=$NFILES RUNS=$RUNS)"
