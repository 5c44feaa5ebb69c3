#!/usr/bin/env bash
# Run the POSIX file-system conformance suite pjdfstest (vendored in third_party/pjdfstest) with
# DIR as the working directory: a plain directory, a FUSE mount, or a path inside a protected region.
#
#   pjdfstest.sh DIR [TEST_DIR...]            e.g. pjdfstest.sh /mnt/x open rename unlink
#   PJD_WRAP="fspf run --" pjdfstest.sh /enc/pjd   the whole run (prove, sh, every pjdfstest process)
#                                             under a wrapper; DIR is then the path the wrapper shows
#
# Needs root (the suite changes owners), perl's prove, a C compiler, autoconf and automake (installed
# with apt-get when missing). Builds once into $PJD_BUILD (default: ~/.cache/pjdfstest-build).
# Last line: "pjdfstest: P/N test files pass, F of T tests fail".
set -Eeuo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../third_party/pjdfstest" && pwd)
# (A copy of ../shared/tools/pjdfstest.sh reading this repository's vendored copy, so that a
# clean clone runs it: `.ci/run` runs a subset through crates/fspf/tests/integration/pjdfstest.rs.)
BUILD=${PJD_BUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/pjdfstest-build}
DIR=${1:?usage: pjdfstest.sh DIR [TEST_DIR...]}; shift
need=()
for c in autoreconf:autoconf aclocal:automake prove:perl cc:gcc make:make; do
  command -v "${c%%:*}" >/dev/null 2>&1 || need+=("${c#*:}")
done
if ((${#need[@]})); then
  SUDO=; [[ $EUID -eq 0 ]] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -qq update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -y -qq install "${need[@]}" >/dev/null
fi
mkdir -p "$(dirname "$BUILD")"
exec 8>"$BUILD.lock"   # concurrent runs (the test suite's) build once
flock 8
if [[ ! -x $BUILD/pjdfstest || $SRC/pjdfstest.c -nt $BUILD/pjdfstest ]]; then
  rm -rf "$BUILD"; mkdir -p "$BUILD"; cp -R "$SRC/." "$BUILD/"; chmod -R u+w "$BUILD"
  (cd "$BUILD" && autoreconf -ifs && ./configure && make pjdfstest) >"$BUILD.log" 2>&1 ||
    { tail -20 "$BUILD.log"; echo "pjdfstest: build failed (log: $BUILD.log)"; exit 2; }
fi
exec 8>&-
tests=()
if (($#)); then for t in "$@"; do tests+=("$BUILD/tests/$t"); done; else tests=("$BUILD/tests"); fi
log=$(mktemp)
# shellcheck disable=SC2086
${PJD_WRAP:-} sh -c 'cd "$1" && shift && exec prove -r "$@"' sh "$DIR" "${tests[@]}" >"$log" 2>&1 || true
grep -E '^(/|Files=|Result)' "$log" | grep -v ' ok$' | sed "s|$BUILD/tests/||" || true
files=$(grep -cE '^/.*\.t \.+' "$log" || true)
okfiles=$(grep -cE '^/.*\.t \.+ ok$' "$log" || true)
total=$(sed -n 's/^Files=[0-9]*, Tests=\([0-9]*\),.*/\1/p' "$log" || true)
failed=$( (grep -oE 'Failed [0-9]+/[0-9]+ subtests' "$log" || true) | awk '{split($2,a,"/"); s+=a[1]} END {print s+0}')
echo "full log: $log"
echo "pjdfstest: $okfiles/$files test files pass, $failed of ${total:-?} tests fail"
