#!/bin/sh
# Made once, never re-run: this records how testdata/fspf/v1 was produced (format version 1).
# Usage: FSPF=target/debug/fspf sh testdata/fspf/v1/make-fixture.sh OUTDIR
set -eu
FSPF=${FSPF:-target/debug/fspf}
OUT=$1
B=/tmp/fspf-fixture-v1
rm -rf "$B" && mkdir -p "$B/enc" "$B/auth/lib" "$B/src/sub"
cd "$B"
printf 'Hello World\n' > src/hello.txt
: > src/empty
python3 -c "import sys; sys.stdout.buffer.write(bytes((i * 131 + 7) % 251 for i in range(10000)))" > src/sub/data.bin
printf 'authenticated readme\n' > auth/readme.txt
python3 -c "import sys; sys.stdout.buffer.write(bytes((i * 17 + 3) % 253 for i in range(9000)))" > auth/lib/libx.so
ln -s lib/libx.so auth/libx-link
printf 'added after the first encrypt\n' > auth/late.txt.new

"$FSPF" create fspf.pb
"$FSPF" addr fspf.pb / --kernel / --not-protected
"$FSPF" addr fspf.pb /enc --encrypted --kernel "$B/enc" -c 4096
"$FSPF" addr fspf.pb /auth --authenticated --kernel "$B/auth" -c 4096
"$FSPF" addf fspf.pb /enc src "$B/enc"
mkdir -p stage && mv auth/late.txt.new stage/
"$FSPF" addf fspf.pb /auth auth
"$FSPF" encrypt fspf.pb > encrypt.out
KEY=$(awk '{print $11}' encrypt.out)
TAG1=$(awk '{print $9}' encrypt.out)
cp fspf.pb fspf.pb.gen-old
# One more, keyed update: the older fspf above stays valid under the same key (rollback case).
mv stage/late.txt.new auth/late.txt
TAG=$("$FSPF" addf fspf.pb /auth auth --key "$KEY" --tag "$TAG1" | awk '{print $NF}')
"$FSPF" verify fspf.pb --key "$KEY" --tag "$TAG"
printf 'Encrypted file system protection file fspf.pb AES-GCM tag: %s key: %s\n' "$TAG" "$KEY" > keytag

mkdir -p "$OUT"
cp -a fspf.pb fspf.pb.trees enc auth keytag "$OUT/"
echo "$TAG1" > "$OUT/.old-tag"
# Broken copies, one defect each.
brk() { rm -rf "$OUT/broken/$1"; mkdir -p "$OUT/broken/$1"; cp -a fspf.pb fspf.pb.trees enc auth "$OUT/broken/$1/"; }
flip() { python3 -c "
import sys; p, o = sys.argv[1], int(sys.argv[2]); b = bytearray(open(p, 'rb').read()); b[o] ^= 0x20; open(p, 'wb').write(b)" "$@"; }
brk fspf_byte_flipped;        flip "$OUT/broken/fspf_byte_flipped/fspf.pb" 100
brk fspf_rolled_back;         cp fspf.pb.gen-old "$OUT/broken/fspf_rolled_back/fspf.pb"
brk chunk_flipped;            flip "$OUT/broken/chunk_flipped/enc/sub/data.bin" $((24 + 4112 + 77))
brk file_truncated;           truncate -s $((24 + 2 * 4112)) "$OUT/broken/file_truncated/enc/sub/data.bin"
brk unlisted_file;            printf 'not in the fspf\n' > "$OUT/broken/unlisted_file/enc/unlisted.txt"
brk auth_file_modified;       flip "$OUT/broken/auth_file_modified/auth/readme.txt" 0
brk auth_tree_flipped;        flip "$(ls "$OUT"/broken/auth_tree_flipped/fspf.pb.trees/* | head -1)" 40
brk file_deleted;             rm "$OUT/broken/file_deleted/enc/empty"
brk files_swapped;            mv "$OUT/broken/files_swapped/enc/hello.txt" "$OUT/broken/files_swapped/x" && \
                              mv "$OUT/broken/files_swapped/enc/empty" "$OUT/broken/files_swapped/enc/hello.txt" && \
                              mv "$OUT/broken/files_swapped/x" "$OUT/broken/files_swapped/enc/empty"
echo "key $KEY tag $TAG"
