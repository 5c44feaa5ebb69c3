#!/usr/bin/env bash
# pjdfstest.sh - POSIX conformance of the in-process shield: the pjdfstest suite (vendored in
# third_party/pjdfstest, run by bench/pjdfstest-run.sh) with the whole run under
# `fspf run --mutable`, in a mutable encrypted region.
#
# Usage (as root, from anywhere in the repo):   bash bench/pjdfstest.sh [TEST_DIR|TEST_FILE...]
#   e.g. bash bench/pjdfstest.sh chmod open/00.t   (default: every test directory)
# Knobs (env): SKIP_BUILD=1, FSPF_BIN=<fspf binary> (default target/release/fspf; the preload
# library is found beside it), PJD_TOOL=<runner> (default bench/pjdfstest-run.sh)
#
# The suite drops to other uids (65534, 65533, ...) inside the run, and under the in-process
# shield those processes commit themselves: the fspf, its directory and the region's kernel
# directory are made writable for them (0666/0777), as a multi-user deployment would.
# Last line: "pjdfstest: P/N test files pass, F of T tests fail".
set -Eeuo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOL=${PJD_TOOL:-$REPO/bench/pjdfstest-run.sh}
[[ -f $TOOL ]] || { echo "pjdfstest.sh: $TOOL not found (set PJD_TOOL)" >&2; exit 2; }
FSPF=${FSPF_BIN:-$REPO/target/release/fspf}
if [[ -z ${SKIP_BUILD:-} ]]; then
  (cd "$REPO" && cargo build --release -q -p fspf -p fspf-preload)
fi
W=$(mktemp -d /var/tmp/fspf-pjd.XXXXXX)
trap 'rm -rf "$W"' EXIT
cd "$W"
mkdir -p vol src/pjd
"$FSPF" create fspf.pb >/dev/null
"$FSPF" addr fspf.pb / --kernel / --not-protected >/dev/null
"$FSPF" addr fspf.pb /enc --kernel "$W/vol" --encrypted >/dev/null
"$FSPF" addf fspf.pb /enc src vol >/dev/null
"$FSPF" encrypt fspf.pb >keytag
awk '{print $11}' keytag >key
chmod 0777 "$W" "$W/vol" "$W/vol/pjd"
chmod 0666 fspf.pb fspf.pb.* 2>/dev/null || true
PJD_WRAP="$FSPF run --fspf $W/fspf.pb --key-file $W/key --tag $(awk '{print $9}' keytag) --mutable --" \
  bash "$TOOL" /enc/pjd "$@"
