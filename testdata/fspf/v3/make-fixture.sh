#!/bin/sh
# Made once, never re-run: this records how testdata/fspf/v3 was produced (format version 3,
# the metadata log). Usage: FSPF=target/release/fspf FSPF_PRELOAD=target/release/libfspf_preload.so \
#        PY=/path/to/python3-binary sh testdata/fspf/v3/make-fixture.sh OUTDIR
set -eu
FSPF=$(realpath "${FSPF:-target/release/fspf}")
FSPF_PRELOAD=$(realpath "${FSPF_PRELOAD:-target/release/libfspf_preload.so}")
export FSPF_PRELOAD
PY=${PY:-python3}
EDITPY=${EDITPY:-$PY}   # edits the log: needs the blake3 module
OUT=$(realpath -m "$1")
B=/tmp/fspf-fixture-v3
rm -rf "$B" && mkdir -p "$B/enc"
cd "$B"
"$FSPF" create fspf.pb
"$FSPF" addr fspf.pb / --kernel / --not-protected
"$FSPF" addr fspf.pb /enc --encrypted --kernel "$B/enc" -c 4096
"$FSPF" encrypt fspf.pb > encrypt.out
TAG0=$(awk '{print $9}' encrypt.out)
KEY=$(awk '{print $11}' encrypt.out)
cp fspf.pb checkpoint.gen0
# Three runs, each committing through the log (the checkpoint stays as `encrypt` wrote it).
"$FSPF" run --fspf fspf.pb --key-file encrypt.out --tag "$TAG0" --mutable --tag-file t1 -- \
  "$PY" -c "
import os
open('/enc/a.txt', 'w').write('first commit\n')
os.mkdir('/enc/d')
open('/enc/d/b.txt', 'w').write('in a directory\n')
"
TAG1=$(tail -n 1 t1)
"$FSPF" run --fspf fspf.pb --key-file encrypt.out --tag "$TAG1" --mutable --tag-file t2 -- \
  "$PY" -c "
import os
open('/enc/a.txt', 'a').write('second commit\n')
os.rename('/enc/d/b.txt', '/enc/d/c.txt')
"
TAG2=$(tail -n 1 t2)
cp fspf.pb.log log.gen2
"$FSPF" run --fspf fspf.pb --key-file encrypt.out --tag "$TAG2" --mutable --tag-file t3 -- \
  "$PY" -c "
open('/enc/e.txt', 'w').write('third commit\n')
"
TAG=$(tail -n 1 t3)
cmp -s fspf.pb checkpoint.gen0 || { echo "the runs wrote a checkpoint" >&2; exit 1; }
"$FSPF" verify fspf.pb --key "$KEY" --tag "$TAG"
printf 'Encrypted file system protection file fspf.pb AES-GCM tag: %s key: %s\n' "$TAG" "$KEY" > keytag

mkdir -p "$OUT"
cp -a fspf.pb fspf.pb.log enc keytag "$OUT/"
echo "$TAG2" > "$OUT/.older-tag"
brk() { rm -rf "$OUT/broken/$1"; mkdir -p "$OUT/broken/$1"; cp -a fspf.pb fspf.pb.log enc "$OUT/broken/$1/"; }
# Edits of the log's records (n u32 | nonce 12 | ciphertext n | tag 16 | check 8), with the
# keyless check recomputed as an attacker would.
edit() { "$EDITPY" - "$@" <<'PYEOF'
import sys, hashlib
try:
    from blake3 import blake3 as b3
except ImportError:
    b3 = None
p, what = sys.argv[1], sys.argv[2]
b = bytearray(open(p, 'rb').read())
recs, at = [], 24
while at + 4 <= len(b):
    n = int.from_bytes(b[at:at + 4], 'little')
    end = at + 4 + 12 + n + 16 + 8
    if end > len(b):
        break
    recs.append(bytes(b[at:end])); at = end
def check(r):
    body = r[:-8]
    h = b3(body).digest()[:8]
    return body + h
if what == 'flip':
    r = bytearray(recs[0]); r[20] ^= 1; recs[0] = check(bytes(r))
elif what == 'swap':
    recs[0], recs[1] = recs[1], recs[0]
elif what == 'replay':
    recs.append(recs[0])
elif what == 'stale':
    b[8] ^= 1
open(p, 'wb').write(bytes(b[:24]) + b''.join(recs))
print(len(recs), 'records')
PYEOF
}
brk log_rolled_back;   cp log.gen2 "$OUT/broken/log_rolled_back/fspf.pb.log"
brk log_removed;       rm "$OUT/broken/log_removed/fspf.pb.log"
brk record_flipped;    edit "$OUT/broken/record_flipped/fspf.pb.log" flip
brk records_swapped;   edit "$OUT/broken/records_swapped/fspf.pb.log" swap
brk record_replayed;   edit "$OUT/broken/record_replayed/fspf.pb.log" replay
brk log_stale;         edit "$OUT/broken/log_stale/fspf.pb.log" stale
echo "key $KEY tag $TAG"
