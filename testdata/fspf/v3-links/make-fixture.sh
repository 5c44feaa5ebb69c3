#!/bin/sh
# Made once, never re-run: this records how this fixture was produced (format version 3 with
# hard links: entry kind 5 and a file's list of its links, field 16).
# Usage: FSPF=target/release/fspf sh make-fixture.sh OUTDIR
set -eu
FSPF=$(realpath "${FSPF:-target/release/fspf}")
OUT=$(realpath -m "$1")
B=/tmp/fspf-fixture-v3-links
rm -rf "$B" && mkdir -p "$B/enc"
cd "$B"
"$FSPF" create fspf.pb
"$FSPF" addr fspf.pb / --kernel / --not-protected
"$FSPF" addr fspf.pb /enc --encrypted --kernel "$B/enc" -c 4096
"$FSPF" encrypt fspf.pb > encrypt.out
TAG0=$(awk '{print $9}' encrypt.out)
KEY=$(awk '{print $11}' encrypt.out)
run() {  # run TAG TAGFILE-OUT SCRIPT
  "$FSPF" run --fspf fspf.pb --key-file encrypt.out --tag "$1" --mutable --tag-file "$2" -- sh -c "$3"
}
# Run 1: a file with two more names (one in a subdirectory, which holds a file too: git keeps
# no empty directories), a fifo with a second name.
run "$TAG0" t1 'set -e; cd /enc; mkdir d; printf "shared content\n" > a; ln a b; ln a d/c;
  printf "kept\n" > d/keep; mkfifo p; ln p q; printf "alone\n" > solo'
TAG1=$(tail -n 1 t1)
# Run 2: the name holding the file goes (it moves to b), the directory holding a link is
# renamed, and the file is appended to through a link.
run "$TAG1" t2 'set -e; cd /enc; rm a; mv d e; printf "more\n" >> e/c'
TAG=$(tail -n 1 t2)
"$FSPF" verify fspf.pb --key "$KEY" --tag "$TAG"
printf 'Encrypted file system protection file fspf.pb AES-GCM tag: %s key: %s\n' "$TAG" "$KEY" > keytag
mkdir -p "$OUT"
for f in fspf.pb fspf.pb.log fspf.pb.trees enc keytag; do
  [ -e "$f" ] && cp -a "$f" "$OUT/"
done
# broken/planted: a file put on disk at a link's name (nothing is stored there).
mkdir -p "$OUT/broken/planted"
for f in fspf.pb fspf.pb.log fspf.pb.trees enc; do
  [ -e "$f" ] && cp -a "$f" "$OUT/broken/planted/"
done
cp enc/solo "$OUT/broken/planted/enc/e/c"
echo "key $KEY tag $TAG"
