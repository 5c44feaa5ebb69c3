#!/usr/bin/env bash
# image.sh - `fspf image protect` throughput and the start time of a protected app, as ratios
# against baselines measured in the same run (issue "fspf image").
#
# Usage (as root, with podman and runc):   bash bench/image.sh
# Knobs (env):  RUNS=5 BENCH_BASE=/var/tmp SKIP_BUILD=1
#
# Rows (median wall time of RUNS):
#   tar|sha256   tar -c of the big rootfs (python3 + its stdlib + a copy of /usr/share, 40 000+
#                files) piped into sha256sum: the baseline
#   protect      fspf image protect of the same files as a one-layer OCI layout (uncompressed
#                layer: the bytes tar -c wrote), /app encrypted; includes writing the output
#   protect-gz   the same image with a gzip layer (as `podman save --format oci-archive`
#                writes it): decompression is part of the cost here, not of the baseline
#   start        podman run of the python image (Hello World), unprotected
#   start-fspf   the same image protected (/app encrypted, the key mounted), same runtime
# Targets: protect >= 50% of tar|sha256 throughput; start-fspf <= 2x start.
#
# This sandbox needs a CONTAINERS_CONF with `default_ulimits = []` and runc (crun refuses the
# hybrid cgroups here); the script sets both.
set -Eeuo pipefail
RUNS=${RUNS:-5}
BENCH_BASE=${BENCH_BASE:-/var/tmp}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FSPF="$REPO/target/release/fspf"
if [[ -z ${SKIP_BUILD:-} ]]; then
  (cd "$REPO" && cargo build --release -q -p fspf)
fi
W=$(mktemp -d "$BENCH_BASE/fspf-image.XXXXXX")
trap 'rm -rf "$W"' EXIT
cd "$W"
printf '[containers]\ndefault_ulimits = []\n' > containers.conf
export CONTAINERS_CONF="$W/containers.conf"
PODMAN=(podman --runtime /usr/sbin/runc)

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# median wall seconds of RUNS runs of "$@" (output discarded); $PRE, if set, runs untimed
# before each run (removing the previous output: deleting 700 MB is not part of the work)
timeit() {
  for _ in $(seq "$RUNS"); do
    local s e
    [[ -n ${PRE:-} ]] && eval "$PRE"
    s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
  done | median
}

log "building the rootfs (python3 + /usr/share)"
bash "$REPO/crates/fspf/tests/images/rootfs.sh" big root
NFILES=$(find root -type f | wc -l)
tar -C root -cf layer.tar .
BYTES=$(stat -c %s layer.tar)
# A one-layer OCI layout from layer.tar (uncompressed, and gzip'ed).
python3 - <<'PY'
import hashlib, json, os, shutil, gzip
def blob(d, data):
    h = hashlib.sha256(data).hexdigest()
    os.makedirs(f"{d}/blobs/sha256", exist_ok=True)
    open(f"{d}/blobs/sha256/{h}", "wb").write(data)
    return "sha256:" + h, len(data)
tar = open("layer.tar", "rb").read()
for d, gz in (("oci", False), ("oci-gz", True)):
    data = gzip.compress(tar, 1) if gz else tar
    ld, ls = blob(d, data)
    diff = "sha256:" + hashlib.sha256(tar).hexdigest()
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["python3", "/app/app.py"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    cd, cs = blob(d, cfg)
    mt = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": mt, "digest": ld, "size": ls}]}).encode()
    md, ms = blob(d, m)
    open(f"{d}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
    open(f"{d}/index.json", "w").write(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
         "annotations": {"org.opencontainers.image.ref.name": "localhost/fspf-bench:big"}}]}))
PY
rm -f layer.tar
log "$NFILES files, $BYTES bytes of tar"
# Warm the page cache for every contender.
tar -C root -cf - . | sha256sum >/dev/null
T_TAR=$(PRE='sync' timeit sh -c 'tar -C root -cf - . | sha256sum')
T_PROT=$(PRE='rm -f out.tar; sync' timeit "$FSPF" image protect oci out.tar --encrypt /app --key-file k)
T_PROTGZ=$(PRE='rm -f out.tar; sync' timeit "$FSPF" image protect oci-gz out.tar --encrypt /app --key-file k)

log "python image: unprotected vs protected start"
bash "$REPO/crates/fspf/tests/images/rootfs.sh" python pyroot
tar -C pyroot -cf py.tar .
"${PODMAN[@]}" rmi -f localhost/fspf-bench:py localhost/fspf-bench:py-fspf >/dev/null 2>&1 || true
"${PODMAN[@]}" import -q -c 'CMD ["python3", "/app/app.py"]' -c 'ENV PATH=/usr/bin:/bin' py.tar localhost/fspf-bench:py >/dev/null
"${PODMAN[@]}" save -q --format oci-archive -o py-oci.tar localhost/fspf-bench:py
"$FSPF" image protect py-oci.tar py-fspf.tar --encrypt /app --key-file pykey --name localhost/fspf-bench:py-fspf >/dev/null
"${PODMAN[@]}" load -q -i py-fspf.tar >/dev/null
[[ $("${PODMAN[@]}" run --rm --network none localhost/fspf-bench:py) == "Hello World" ]]
[[ $("${PODMAN[@]}" run --rm --network none -v "$W/pykey:/run/secrets/fspf-key:ro" localhost/fspf-bench:py-fspf) == "Hello World" ]]
T_START=$(timeit "${PODMAN[@]}" run --rm --network none localhost/fspf-bench:py)
T_STARTF=$(timeit "${PODMAN[@]}" run --rm --network none -v "$W/pykey:/run/secrets/fspf-key:ro" localhost/fspf-bench:py-fspf)
"${PODMAN[@]}" rmi -f localhost/fspf-bench:py localhost/fspf-bench:py-fspf >/dev/null 2>&1 || true

mbs() { echo "$BYTES / $1 / 1000000" | bc -l | xargs printf '%.0f'; }
printf '\n%s files, %s MB of tar, RUNS=%s, %s\n\n' "$NFILES" "$((BYTES / 1000000))" "$RUNS" "$(date -u +%F)"
printf '| row | time (s) | MB/s | ratio | target |\n|---|---|---|---|---|\n'
printf '| tar \\| sha256 | %.3f | %s | 1 (baseline) | |\n' "$T_TAR" "$(mbs "$T_TAR")"
printf '| protect | %.3f | %s | %.2f of baseline throughput | >= 0.50 |\n' "$T_PROT" "$(mbs "$T_PROT")" "$(echo "$T_TAR / $T_PROT" | bc -l)"
printf '| protect-gz | %.3f | %s | %.2f of baseline throughput | (gzip input) |\n' "$T_PROTGZ" "$(mbs "$T_PROTGZ")" "$(echo "$T_TAR / $T_PROTGZ" | bc -l)"
printf '| start | %.3f | | 1 (baseline) | |\n' "$T_START"
printf '| start-fspf | %.3f | | %.2fx | <= 2x |\n' "$T_STARTF" "$(echo "$T_STARTF / $T_START" | bc -l)"
