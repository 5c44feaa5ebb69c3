#!/bin/sh
# Made once, never re-run: this records how testdata/fspf/v2 was produced (format version 2).
# Usage: FSPF=target/release/fspf FSPF_PRELOAD=target/release/libfspf_preload.so \
#        PY=/path/to/python3-binary sh testdata/fspf/v2/make-fixture.sh OUTDIR
set -eu
FSPF=$(realpath "${FSPF:-target/release/fspf}")
FSPF_PRELOAD=$(realpath "${FSPF_PRELOAD:-target/release/libfspf_preload.so}")
export FSPF_PRELOAD
PY=${PY:-python3}
OUT=$(realpath -m "$1")
B=/tmp/fspf-fixture-v2
rm -rf "$B" && mkdir -p "$B/enc"
cd "$B"
"$FSPF" create fspf.pb
"$FSPF" addr fspf.pb / --kernel / --not-protected
"$FSPF" addr fspf.pb /enc --encrypted --kernel "$B/enc" -c 4096
"$FSPF" encrypt fspf.pb > encrypt.out
TAG0=$(awk '{print $9}' encrypt.out)
KEY=$(awk '{print $11}' encrypt.out)
# Generation 1: a format-2 file (300 000 bytes: 74 chunks, more than 16) written whole through
# the shield, and a small file (format 1) beside it.
"$FSPF" run --fspf fspf.pb --key-file encrypt.out --tag "$TAG0" --mutable --tag-file t1 -- \
  "$PY" -c "
open('/enc/big', 'wb').write(bytes((i * 37 + 11) % 251 for i in range(300000)))
open('/enc/small.txt', 'w').write('a small file stays format 1\n')
"
TAG1=$(tail -n 1 t1)
cp fspf.pb fspf.pb.gen1 && cp -a enc enc.gen1 && cp -a fspf.pb.trees trees.gen1
# Generation 2: the format-2 file updated in place (private buffers: the tracked ranges only):
# 16 bytes at 200 000 (chunk 48) and an appended line (the last chunk and the tree's right edge).
FSPF_SHARED_BUFFERS=0 "$FSPF" run --fspf fspf.pb --key-file encrypt.out --tag "$TAG1" --mutable \
  --tag-file t2 -- "$PY" -c "
import os
fd = os.open('/enc/big', os.O_RDWR)
os.pwrite(fd, b'updated in place', 200000)
os.close(fd)
open('/enc/big', 'ab').write(b'appended line\n')
"
TAG=$(tail -n 1 t2)
"$FSPF" verify fspf.pb --key "$KEY" --tag "$TAG"
printf 'Encrypted file system protection file fspf.pb AES-GCM tag: %s key: %s\n' "$TAG" "$KEY" > keytag

mkdir -p "$OUT"
cp -a fspf.pb fspf.pb.trees enc keytag "$OUT/"
echo "$TAG1" > "$OUT/.older-tag"
TREE=$(ls fspf.pb.trees)
# Broken copies, one defect each.
brk() { rm -rf "$OUT/broken/$1"; mkdir -p "$OUT/broken/$1"; cp -a fspf.pb fspf.pb.trees enc "$OUT/broken/$1/"; }
flip() { "$PY" -c "
import sys; p, o = sys.argv[1], int(sys.argv[2]); b = bytearray(open(p, 'rb').read()); b[o] ^= 0x20; open(p, 'wb').write(b)" "$@"; }
brk fspf_rolled_back;   cp fspf.pb.gen1 "$OUT/broken/fspf_rolled_back/fspf.pb"
brk chunk_rolled_back;  "$PY" -c "
import sys
new, old = sys.argv[1], sys.argv[2]
b = bytearray(open(new, 'rb').read()); o = open(old, 'rb').read()
at = 24 + 48 * 4096
b[at:at + 4096] = o[at:at + 4096]
open(new, 'wb').write(b)" "$OUT/broken/chunk_rolled_back/enc/big" enc.gen1/big
brk tree_rolled_back;   cp "trees.gen1/$TREE" "$OUT/broken/tree_rolled_back/fspf.pb.trees/$TREE"
brk state_rolled_back;  cp enc.gen1/big "$OUT/broken/state_rolled_back/enc/big" && \
                        cp "trees.gen1/$TREE" "$OUT/broken/state_rolled_back/fspf.pb.trees/$TREE"
brk page_flipped;       flip "$OUT/broken/page_flipped/fspf.pb.trees/$TREE" 40
brk chunk_flipped;      flip "$OUT/broken/chunk_flipped/enc/big" $((24 + 10 * 4096 + 5))
brk format1_header;     "$PY" -c "
import sys; p = sys.argv[1]; b = bytearray(open(p, 'rb').read()); b[5] = 1; open(p, 'wb').write(b)" \
                        "$OUT/broken/format1_header/enc/big"
brk tree_missing;       rm "$OUT/broken/tree_missing/fspf.pb.trees/$TREE"
echo "key $KEY tag $TAG"
