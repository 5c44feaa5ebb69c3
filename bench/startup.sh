#!/usr/bin/env bash
# startup.sh - what a shielded process pays for the size of the volume (issue "one engine"):
# process start, path operations and namespace changes under `fspf run`, as ratios against the
# same workload run natively in the same run.
#
# Usage (as root, from anywhere in the repo):   bash bench/startup.sh
# Knobs (env):  NFILES=50000 RMFILES=10000 RUNS=5 BENCH_BASE=/var/tmp SKIP_BUILD=1
#               PYBIN=<interpreter binary>   (default: python3's sys.executable, i.e. the real
#               interpreter, not this machine's pyenv launcher script; the launcher is timed in
#               its own row because under the shield it multiplies per-process cost)
#
# Rows (median wall time of RUNS, whole process including `fspf run`'s own checks):
#   py-pass     PYBIN -c pass, cwd outside any region, fspf listing NFILES files in /enc
#   py-launch   the same through `python3` on PATH (pyenv launcher: shells, then Python)
#   sh-true10   sh -c running /bin/true ten times, same fspf
#   stdlib      PYBIN -c 'import json,email,http.client,sqlite3' with Python's stdlib directory as
#               an authenticated region in place (kernel path = embed path), in its own fspf
#   find        find over the NFILES listed files (names only)
#   ls-lR       ls -lR over them
#   rm-r        rm -r of RMFILES files (mutable encrypted region; includes the final commit)
# Targets (issue 7): py-pass <= 1.3x, stdlib <= 2x, rm-r <= 3x, find/ls-lR <= 3x, sh-true10 <= 2x.
set -Eeuo pipefail
NFILES=${NFILES:-50000}
RMFILES=${RMFILES:-10000}
RUNS=${RUNS:-5}
BENCH_BASE=${BENCH_BASE:-/var/tmp}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FSPF="$REPO/target/release/fspf"
export FSPF_PRELOAD="$REPO/target/release/libfspf_preload.so"
if [[ -z ${SKIP_BUILD:-} ]]; then
  (cd "$REPO" && cargo build --release -q -p fspf -p fspf-preload)
fi
PYBIN=${PYBIN:-$(python3 -c 'import sys; print(sys.executable)')}
STDLIB=$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
W=$(mktemp -d "$BENCH_BASE/fspf-startup.XXXXXX")
trap 'rm -rf "$W"' EXIT
cd "$W"

# median wall seconds of RUNS runs of "$@"
median() {
  local t=() i s e
  for ((i = 0; i < RUNS; i++)); do
    s=$(date +%s%N); "$@" >/dev/null 2>&1 || { log "failed: $*"; return 1; }; e=$(date +%s%N)
    t+=($(((e - s) / 1000)))
  done
  printf '%s\n' "${t[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.4f", a[int((NR+1)/2)]/1e6}'
}

log "building a fspf of $NFILES files in /enc"
mkdir -p src/enc vol rmsrc
"$PYBIN" - "$NFILES" <<'PY'
import os, sys
n = int(sys.argv[1])
for i in range(n):
    d = f"src/enc/d{i % 100:03d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:06d}", "w") as f:
        f.write(f"file {i}\n")
PY
"$FSPF" create fspf.pb >/dev/null
"$FSPF" addr fspf.pb / --kernel / --not-protected >/dev/null
"$FSPF" addr fspf.pb /enc --encrypted --kernel "$W/vol" >/dev/null
"$FSPF" addf fspf.pb /enc src/enc vol >/dev/null
"$FSPF" encrypt fspf.pb | awk '{print $11}' > key
TAG=$("$FSPF" show --tag fspf.pb)
run() { "$FSPF" run --fspf "$W/fspf.pb" --key-file "$W/key" --tag "$TAG" -- "$@"; }
log "a second fspf: Python's stdlib ($STDLIB) as an authenticated region in place"
"$FSPF" create py.pb >/dev/null
"$FSPF" addr py.pb / --kernel / --not-protected >/dev/null
"$FSPF" addr py.pb "$STDLIB" --authenticated --kernel "$STDLIB" >/dev/null
"$FSPF" addf py.pb "$STDLIB" "$STDLIB" >/dev/null
"$FSPF" encrypt py.pb | awk '{print $11}' > pykey
PYTAG=$("$FSPF" show --tag py.pb)
runpy() { "$FSPF" run --fspf "$W/py.pb" --key-file "$W/pykey" --tag "$PYTAG" -- "$@"; }

row() { # name native-cmd... -- shielded uses the same command
  local name=$1; shift
  local n s
  n=$(median "$@"); s=$(median run "$@")
  printf '%-10s native %8.4f s  shield %8.4f s  ratio %6.2fx\n' "$name" "$n" "$s" "$(echo "$s / $n" | bc -l)"
}
cd /
row py-pass "$PYBIN" -c pass
row py-launch python3 -c pass
row sh-true10 sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done'
n=$(median "$PYBIN" -c 'import json, email, http.client, sqlite3')
s=$(median runpy "$PYBIN" -c 'import json, email, http.client, sqlite3')
printf '%-10s native %8.4f s  shield %8.4f s  ratio %6.2fx\n' stdlib "$n" "$s" "$(echo "$s / $n" | bc -l)"
# find/ls: native over the plaintext tree, shielded over the same names in /enc
n=$(median find "$W/src/enc"); s=$(median run find /enc)
printf '%-10s native %8.4f s  shield %8.4f s  ratio %6.2fx\n' find "$n" "$s" "$(echo "$s / $n" | bc -l)"
n=$(median ls -lR "$W/src/enc"); s=$(median run ls -lR /enc)
printf '%-10s native %8.4f s  shield %8.4f s  ratio %6.2fx\n' ls-lR "$n" "$s" "$(echo "$s / $n" | bc -l)"
# rm -r of RMFILES files: each run gets a fresh copy (native) / a fresh mutable fspf (shield)
cd "$W"
rm_native() { rm -rf rmn; mkdir rmn; (cd rmn && "$PYBIN" -c "
import os
for i in range($RMFILES):
    os.makedirs(f'd{i%100}', exist_ok=True); open(f'd{i%100}/f{i}','w').write('x')"); sync; local s e; s=$(date +%s%N); sh -c 'rm -r rmn/*'; e=$(date +%s%N); echo $(((e - s) / 1000)); }
rm_shield() {
  rm -rf rmv rms rm.pb; mkdir rmv rms
  (cd rms && "$PYBIN" -c "
import os
for i in range($RMFILES):
    os.makedirs(f'd{i%100}', exist_ok=True); open(f'd{i%100}/f{i}','w').write('x')")
  "$FSPF" create rm.pb >/dev/null; "$FSPF" addr rm.pb / --kernel / --not-protected >/dev/null
  "$FSPF" addr rm.pb /rm --encrypted --kernel "$W/rmv" >/dev/null; "$FSPF" addf rm.pb /rm rms rmv >/dev/null
  local t; t=$("$FSPF" show --tag rm.pb)
  local s e; s=$(date +%s%N)
  "$FSPF" run --fspf rm.pb --tag "$t" --mutable -- sh -c 'rm -r /rm/*' >/dev/null
  e=$(date +%s%N); echo $(((e - s) / 1000))
}
med() { local t=() i; for ((i = 0; i < RUNS; i++)); do t+=($("$@")); done; printf '%s\n' "${t[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.4f", a[int((NR+1)/2)]/1e6}'; }
n=$(med rm_native); s=$(med rm_shield)
printf '%-10s native %8.4f s  shield %8.4f s  ratio %6.2fx\n' rm-r "$n" "$s" "$(echo "$s / $n" | bc -l)"
