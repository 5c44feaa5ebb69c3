#!/usr/bin/env bash
# addf.sh - throughput of `fspf addf` against ceilings and peers measured in the same run.
#
# Usage (as root, from anywhere in the repo):   bash bench/addf.sh
# Knobs (env):  SIZE_MB=1024 NFILES=50000 RUNS=3
#               SRC_BASE=/dev/shm   where the generated source tree lives (tmpfs: reading it is free)
#               BENCH_BASE=/dev/shm where outputs go (ciphertext, cp -r copies, gocryptfs cipherdir).
#                                   tmpfs by default so the numbers measure fspf, not the disk;
#                                   BENCH_BASE=/var/tmp measures ext4 on this VM's virtio disk.
#               RESULTS_FILE=<path> (also write the final table there)
#               SKIP_BUILD=1        (use target/release/fspf as is)
#               STAT=median|min     statistic over RUNS (min = fastest run; use it on a shared machine)
#
# What is measured (medians of RUNS; every output is fresh and removed after its run):
#   addf-enc    fspf create + addr /data --encrypted --kernel OUT; timed: fspf addf F /data SRC OUT
#   addf-auth   fspf create + addr /data --authenticated --kernel SRC; timed: fspf addf F /data SRC
#               (plaintext stays where it is: only reads + keyed BLAKE3 + Merkle outboards)
#   cp -r       cp -r SRC OUT  (same destination file system as addf-enc)
#   gocryptfs   cp -r SRC MNT + sync, gocryptfs cipherdir in BENCH_BASE (if installable)
#   b3sum       b3sum over the same files (multi-threaded for one big file)
#   sha256sum   sha256sum over the same files (1 core)
#   openssl     openssl speed -evp aes-256-gcm, 1 core, 64 KiB (= fspf's default chunk) and 16 KiB
#   codec       fspf-core's import codec alone, memory to io::sink (examples/seal_throughput.rs):
#               what addf could reach if writing the output cost nothing
#   dd write    dd if=/dev/zero of=BENCH_BASE/new bs=1M: the cost of creating SIZE_MB of new file
#               pages on the output file system, the floor under addf-enc and cp -r
# Before measuring, 3 x SIZE_MB of memory is written and freed once: on a fresh VM (Firecracker
# here) the first touch of guest pages is 2-3x slower than later runs and would skew run 1.
# Two trees: (a) one SIZE_MB file of random bytes, (b) NFILES files of 1-8 KiB in 100 directories.
#
# Targets (docs/../DESIGN.md §5): large-file addf-enc >= 0.60 x (openssl aes-256-gcm 1 core x nproc)
# and >= 3x gocryptfs cp -r; small files >= 20 000 files/s.
set -Eeuo pipefail

SIZE_MB=${SIZE_MB:-1024}
NFILES=${NFILES:-50000}
RUNS=${RUNS:-3}
SRC_BASE=${SRC_BASE:-/dev/shm}
BENCH_BASE=${BENCH_BASE:-/dev/shm}
RESULTS_FILE=${RESULTS_FILE:-}
PW="addf-bench-password"   # throwaway password for a throwaway gocryptfs

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$REPO/bench/lib.sh"
[[ $EUID -eq 0 ]] || die "run as root (needs apt-get and /dev/fuse for gocryptfs)"

FSPF="$REPO/target/release/fspf"

# ---------------------------------------------------------------- install + build
install_missing gocryptfs=gocryptfs fusermount3=fuse3 openssl=openssl b3sum=b3sum python3=python3 \
  mountpoint=util-linux
command -v python3 >/dev/null || die "python3 required"
if [[ -z ${SKIP_BUILD:-} ]]; then
  log "cargo build --release"
  (cd "$REPO" && cargo build --release -q && cargo build --release -q --example seal_throughput) ||
    die "cargo build --release failed"
fi
SEAL="$REPO/target/release/examples/seal_throughput"
[[ -x $FSPF ]] || die "$FSPF missing (build with cargo build --release)"

# ---------------------------------------------------------------- workspace / cleanup
SRC=$(mktemp -d "$SRC_BASE/addf-src.XXXXXX")
W=$(mktemp -d "$BENCH_BASE/addf-out.XXXXXX")
GMNT=""; GPID=""
cleanup() {
  local rc=$? i
  set +e
  if [[ -n $GMNT ]] && mountpoint -q "$GMNT"; then
    for i in 1 2 3 4 5; do fusermount3 -u "$GMNT" 2>/dev/null && break; sleep 1; done
    mountpoint -q "$GMNT" && fusermount3 -uz "$GMNT"
  fi
  [[ -n $GPID ]] && wait "$GPID" 2>/dev/null
  if findmnt -rn -o TARGET | grep -q "^$W"; then log "mount under $W still present; leaving it"; else rm -rf "$W"; fi
  rm -rf "$SRC"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
el()  { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.6f", b-a}'; }
median() {  # or the fastest run with STAT=min (more robust when other work shares the machine)
  if [[ ${STAT:-median} == min ]]; then printf '%s\n' "$@" | sort -g | head -1; return; fi
  printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "n/a"} else if(NR%2){print a[(NR+1)/2]} else {printf "%.6g\n",(a[NR/2]+a[NR/2+1])/2} }'
}
mbps() { awk -v s="$1" -v mb="$SIZE_MB" 'BEGIN{printf "%.0f", mb*1.048576/s}'; }   # MB = 1e6 bytes
rate() { awk -v s="$1" -v n="$2" 'BEGIN{printf "%.0f", n/s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0 || a == "n/a" || b == "n/a") print "n/a"; else printf "%.2f", a/b }'; }
timeit() { local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now); el "$t0" "$t1"; }   # prints seconds

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
awk -v l="${LOAD0%% *}" 'BEGIN{exit !(l > 0.5)}' && log "WARNING: load average $LOAD0: other work on this machine will skew the numbers"

# ---------------------------------------------------------------- source trees
log "source in $SRC ($(findmnt -n -o FSTYPE --target "$SRC" | head -1)), outputs in $W ($(findmnt -n -o FSTYPE --target "$W" | head -1))"
log "generating (a) ${SIZE_MB} MiB random file, (b) $NFILES files of 1-8 KiB"
mkdir -p "$SRC/big" "$SRC/small"
head -c $((SIZE_MB*1048576)) /dev/urandom > "$SRC/big/big.bin"
python3 - "$SRC/small" "$NFILES" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(1234)
buf = os.urandom(16384)
for d in range(100):
    os.makedirs(os.path.join(root, "d%02d" % d), exist_ok=True)
for i in range(n):
    s = rng.randint(1024, 8192)
    o = rng.randint(0, 8192)
    with open(os.path.join(root, "d%02d" % (i % 100), "f%06d" % i), "wb") as f:
        f.write(buf[o:o + s])
EOF
SMALL_MB=$(du -sm --apparent-size "$SRC/small" | cut -f1)
log "pre-touching $((3*SIZE_MB)) MiB of output memory"
dd if=/dev/zero of="$W/warm" bs=1M count=$((3*SIZE_MB)) status=none; rm -f "$W/warm"

# ---------------------------------------------------------------- fspf runs
# fspf_addf <enc|auth> <tree>  -> seconds of the addf alone
fspf_addf() {
  local mode=$1 tree=$2 d="$W/fspf.$1" t
  rm -rf "$d"; mkdir -p "$d/out"
  "$FSPF" create "$d/fspf.pb" >/dev/null
  if [[ $mode == enc ]]; then
    "$FSPF" addr "$d/fspf.pb" /data --encrypted --kernel "$d/out" >/dev/null
    sync
    t=$(timeit "$FSPF" addf "$d/fspf.pb" /data "$SRC/$tree" "$d/out")
  else
    "$FSPF" addr "$d/fspf.pb" /data --authenticated --kernel "$SRC/$tree" >/dev/null
    sync
    t=$(timeit "$FSPF" addf "$d/fspf.pb" /data "$SRC/$tree")
  fi
  rm -rf "$d"
  echo "$t"
}
cp_r() { local t; rm -rf "$W/cp"; sync; t=$(timeit cp -r "$SRC/$1" "$W/cp"); rm -rf "$W/cp"; echo "$t"; }
files_of() { find "$SRC/$1" -type f -print0; }
hash_tree() {  # $1 tool $2 tree
  local t0 t1
  t0=$(now); files_of "$2" | xargs -0 -n 5000 "$1" >/dev/null; t1=$(now); el "$t0" "$t1"
}

GOK=0
if command -v gocryptfs >/dev/null && [[ -e /dev/fuse ]]; then
  printf '%s\n' "$PW" > "$W/pw"
  mkdir -p "$W/gc.cipher" "$W/gc.mnt"
  if gocryptfs -init -q -scryptn 10 -passfile "$W/pw" "$W/gc.cipher" >/dev/null 2>&1; then
    gocryptfs -fg -q -passfile "$W/pw" "$W/gc.cipher" "$W/gc.mnt" >"$W/gocryptfs.log" 2>&1 &
    GPID=$!; GMNT="$W/gc.mnt"
    for i in $(seq 100); do mountpoint -q "$GMNT" && { GOK=1; break; }; sleep 0.1; done
  fi
  ((GOK)) || log "gocryptfs mount failed; skipping it"
else
  log "gocryptfs not installable; skipping it"
fi
gc_cp() { local t0 t1; t0=$(now); cp -r "$SRC/$1" "$GMNT/x"; sync; t1=$(now); rm -rf "$GMNT/x"; el "$t0" "$t1"; }

declare -A T
for tree in big small; do
  log "$tree: $RUNS runs of addf-enc, addf-auth, cp -r, gocryptfs cp -r, b3sum, sha256sum"
  ae=(); aa=(); cr=(); gc=(); b3=(); sh=()
  for ((i=0; i<RUNS; i++)); do
    ae+=("$(fspf_addf enc "$tree")")
    aa+=("$(fspf_addf auth "$tree")")
    cr+=("$(cp_r "$tree")")
    ((GOK)) && gc+=("$(gc_cp "$tree")")
    b3+=("$(hash_tree b3sum "$tree")")
    sh+=("$(hash_tree sha256sum "$tree")")
  done
  log "$tree seconds: addf-enc ${ae[*]} | addf-auth ${aa[*]} | cp ${cr[*]} | gocryptfs ${gc[*]:-} | b3sum ${b3[*]} | sha256sum ${sh[*]}"
  T[$tree,ae]=$(median "${ae[@]}"); T[$tree,aa]=$(median "${aa[@]}"); T[$tree,cr]=$(median "${cr[@]}")
  T[$tree,gc]=$( ((GOK)) && median "${gc[@]}" || echo n/a)
  T[$tree,b3]=$(median "${b3[@]}"); T[$tree,sh]=$(median "${sh[@]}")
done

dw=()
for ((i=0; i<RUNS; i++)); do
  sync; t0=$(now); dd if=/dev/zero of="$W/dd" bs=1M count="$SIZE_MB" status=none; t1=$(now); rm -f "$W/dd"; dw+=("$(el "$t0" "$t1")")
done
DDW=$(mbps "$(median "${dw[@]}")")
CODEC_ENC=n/a; CODEC_AUTH=n/a
if [[ -x $SEAL ]]; then
  read -r _ CODEC_ENC < <(SIZE_MB=$SIZE_MB RUNS=$RUNS "$SEAL" | grep '^enc')
  read -r _ CODEC_AUTH < <(SIZE_MB=$SIZE_MB RUNS=$RUNS "$SEAL" | grep '^auth')
fi
# openssl speed prints 1000s of bytes/s; /1000 -> MB/s
ossl() { openssl speed -seconds 2 "$@" 2>/dev/null | tail -1 | awk '{printf "%.0f", $NF/1000}'; }
GCM64K=$(ossl -bytes 65536 -evp aes-256-gcm)
GCM16K=$(ossl -bytes 16384 -evp aes-256-gcm)
NPROC=$(nproc)
CEIL=$((GCM64K * NPROC))

# ---------------------------------------------------------------- report
big_mbps()   { [[ $1 == n/a ]] && echo n/a || mbps "$1"; }
small_fps()  { [[ $1 == n/a ]] && echo n/a || rate "$1" "$NFILES"; }
small_mbps() { [[ $1 == n/a ]] && echo n/a || awk -v s="$1" -v mb="$SMALL_MB" 'BEGIN{printf "%.0f", mb*1.048576/s}'; }
declare -A B S SM
for k in ae aa cr gc b3 sh; do
  B[$k]=$(big_mbps "${T[big,$k]}"); S[$k]=$(small_fps "${T[small,$k]}"); SM[$k]=$(small_mbps "${T[small,$k]}")
done
verdict() { awk -v a="$1" -v t="$2" 'BEGIN{ if (a == "n/a") print "n/a"; else if (a+0 >= t+0) print "MET"; else print "MISSED" }'; }
{
echo
echo "addf.sh  $(date -u +%FT%TZ)  host: $NPROC cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r), load at start $LOAD0, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "fspf $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) | $(openssl version | cut -d' ' -f1-2) | b3sum $(b3sum --version 2>/dev/null | awk '{print $2}') | gocryptfs $(gocryptfs -version 2>/dev/null | awk '{print $2}' | tr -d ';')"
echo "source: $SRC_BASE ($(findmnt -n -o FSTYPE --target "$SRC_BASE" | head -1)); outputs: $BENCH_BASE ($(findmnt -n -o FSTYPE --target "$BENCH_BASE" | head -1)); size=${SIZE_MB}MiB files=${NFILES} (${SMALL_MB} MiB) runs=${RUNS}; ${STAT:-median} of runs; MB = 1e6 B"
echo
printf '%-22s | %12s | %10s %10s\n' tool "${SIZE_MB}MiB file" "${NFILES} files" ""
printf '%-22s | %12s | %10s %10s\n' "" MB/s files/s MB/s
echo "-----------------------+--------------+----------------------"
row() { printf '%-22s | %12s | %10s %10s\n' "$1" "${B[$2]}" "${S[$2]}" "${SM[$2]}"; }
row "fspf addf encrypted" ae
row "fspf addf authentic." aa
row "cp -r" cr
row "gocryptfs cp -r" gc
row "b3sum" b3
row "sha256sum" sh
echo "-----------------------+--------------+----------------------"
printf 'codec in memory (no file system): enc %s MB/s, auth %s MB/s; dd if=/dev/zero of=new file: %s MB/s\n' "$CODEC_ENC" "$CODEC_AUTH" "$DDW"
printf 'openssl speed -evp aes-256-gcm, 1 core: %s MB/s @64 KiB, %s MB/s @16 KiB; ceiling = 64 KiB x %s cores = %s MB/s\n' "$GCM64K" "$GCM16K" "$NPROC" "$CEIL"
echo
r=$(ratio "${B[ae]}" "$CEIL")
printf 'addf-enc  %sMiB: %s MB/s = %s x (openssl aes-256-gcm x nproc)   target >= 0.60  %s\n' "$SIZE_MB" "${B[ae]}" "$r" "$(verdict "$r" 0.60)"
r=$(ratio "$CODEC_ENC" "$CEIL")
printf 'codec-enc in memory: %s MB/s = %s x (openssl aes-256-gcm x nproc)      target >= 0.60  %s\n' "$CODEC_ENC" "$r" "$(verdict "$r" 0.60)"
printf 'addf-enc  %sMiB: %s x the dd write floor of the output fs, %s x the in-memory codec\n' "$SIZE_MB" "$(ratio "${B[ae]}" "$DDW")" "$(ratio "${B[ae]}" "$CODEC_ENC")"
r=$(ratio "${B[ae]}" "${B[gc]}")
printf 'addf-enc  %sMiB: %s x gocryptfs cp -r                              target >= 3     %s\n' "$SIZE_MB" "$r" "$(verdict "$r" 3)"
printf 'addf-enc  %sMiB: %s x cp -r\n' "$SIZE_MB" "$(ratio "${B[ae]}" "${B[cr]}")"
printf 'addf-auth %sMiB: %s MB/s = %s x b3sum, %s x sha256sum\n' "$SIZE_MB" "${B[aa]}" "$(ratio "${B[aa]}" "${B[b3]}")" "$(ratio "${B[aa]}" "${B[sh]}")"
printf 'addf-enc  small: %s files/s                                           target >= 20000 %s\n' "${S[ae]}" "$(verdict "${S[ae]}" 20000)"
printf 'addf-enc  small: %s x gocryptfs cp -r, %s x cp -r\n' "$(ratio "${S[ae]}" "${S[gc]}")" "$(ratio "${S[ae]}" "${S[cr]}")"
printf 'addf-auth small: %s files/s                                           target >= 20000 %s\n' "${S[aa]}" "$(verdict "${S[aa]}" 20000)"
printf 'addf-auth small: %s x b3sum, %s x sha256sum\n' "$(ratio "${S[aa]}" "${S[b3]}")" "$(ratio "${S[aa]}" "${S[sh]}")"
} | if [[ -n $RESULTS_FILE ]]; then tee "$RESULTS_FILE"; else cat; fi
