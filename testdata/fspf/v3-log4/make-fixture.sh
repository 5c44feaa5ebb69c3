#!/bin/sh
# Made once, never re-run: this records how this fixture was produced (format version 3 with a
# version-LOGV metadata log). Usage: FSPF=target/release/fspf PY=/path/to/python3-binary \
#        LOGV=4|5 sh make-fixture.sh OUTDIR
set -eu
FSPF=$(realpath "${FSPF:-target/release/fspf}")
PY=${PY:-python3}
LOGV=${LOGV:?LOGV=4 or 5}
OUT=$(realpath -m "$1")
B=/tmp/fspf-fixture-v3-log$LOGV
rm -rf "$B" && mkdir -p "$B/enc"
cd "$B"
"$FSPF" create fspf.pb
"$FSPF" addr fspf.pb / --kernel / --not-protected
"$FSPF" addr fspf.pb /enc --encrypted --kernel "$B/enc" -c 4096
"$FSPF" encrypt fspf.pb > encrypt.out
TAG0=$(awk '{print $9}' encrypt.out)
KEY=$(awk '{print $11}' encrypt.out)
cp fspf.pb checkpoint.gen0
run() {  # run TAGFILE-IN TAGFILE-OUT PYTHON-CODE
  "$FSPF" run --fspf fspf.pb --key-file encrypt.out --tag "$1" --mutable --tag-file "$2" -- "$PY" -c "$3"
}
# Run 1: a format-2 file (300 000 bytes: more than 16 chunks of 4 KiB) and a small one.
run "$TAG0" t1 "
open('/enc/big', 'wb').write(bytes((i * 37 + 11) % 251 for i in range(300000)))
open('/enc/small.txt', 'w').write('a small file\n')
"
TAG1=$(tail -n 1 t1)
# The data and tree files as they were before run 2: what a crash before the application of
# run 2's journal (carried in its log record) leaves.
mkdir -p before2
cp -a enc/big before2/big
cp -a fspf.pb.trees before2/trees
# Run 2: an in-place update of /enc/big (its journal rides in the log record) and a new small
# file (in a version-5 log, whole in the record).
run "$TAG1" t2 "
f = open('/enc/big', 'r+b'); f.seek(200000); f.write(b'updated in place'); f.close()
open('/enc/new.txt', 'w').write('carried by the log\n')
"
TAG=$(tail -n 1 t2)
cmp -s fspf.pb checkpoint.gen0 || { echo "the runs wrote a checkpoint" >&2; exit 1; }
"$FSPF" verify fspf.pb --key "$KEY" --tag "$TAG"
printf 'Encrypted file system protection file fspf.pb AES-GCM tag: %s key: %s\n' "$TAG" "$KEY" > keytag
head -c 8 fspf.pb.log | od -An -c
mkdir -p "$OUT"
cp -a fspf.pb fspf.pb.log fspf.pb.trees enc keytag "$OUT/"
# crashed/: copies a crash or power loss may leave, which must read as the committed state.
mkdir -p "$OUT/crashed/before_apply"
cp -a fspf.pb fspf.pb.log enc "$OUT/crashed/before_apply/"
cp -a before2/trees "$OUT/crashed/before_apply/fspf.pb.trees"
cp -a before2/big "$OUT/crashed/before_apply/enc/big"
if [ "$LOGV" = 5 ]; then
  # /enc/new.txt rides in the log record: lost, it is restored from there.
  mkdir -p "$OUT/crashed/before_publish"
  cp -a fspf.pb fspf.pb.log fspf.pb.trees enc "$OUT/crashed/before_publish/"
  rm "$OUT/crashed/before_publish/enc/new.txt"
fi
echo "key $KEY tag $TAG"
