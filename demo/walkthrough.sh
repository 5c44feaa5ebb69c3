#!/usr/bin/env bash
# The reference walkthrough (SCONE "File Protection"), with `scone fspf` replaced by `fspf`,
# run end to end in a temporary directory. Embed path /data maps to the kernel directory
# $DEMO/volume, so nothing outside the temp dir is touched.
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
echo "# building fspf (release)" >&2
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --workspace
export PATH="$ROOT/target/release:$PATH"
DEMO=$(mktemp -d /tmp/fspf-demo.XXXXXX)
trap 'rm -rf "$DEMO"' EXIT
cd "$DEMO"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

mkdir -p volume data-original
cat > data-original/hello.txt << 'EOT'
Hello World
EOT
cat > data-original/world.py << 'EOT'
f = open('/data/hello.txt', 'r')
print(str(f.read()))
EOT
step sha256sum data-original/hello.txt data-original/world.py

step fspf create volume/fspf.pb
step fspf addr volume/fspf.pb / --kernel / --not-protected
step fspf addr volume/fspf.pb /data --encrypted --kernel "$DEMO/volume"
step fspf addf volume/fspf.pb /data data-original volume
step sha256sum volume/hello.txt volume/world.py
printf '\n# ciphertext on disk (volume/hello.txt):\n'
od -A d -t x1 volume/hello.txt | head -4

printf '\n\033[1m$ fspf encrypt volume/fspf.pb > data-original/keytag\033[0m\n'
fspf encrypt volume/fspf.pb > data-original/keytag
cat data-original/keytag
SCONE_FSPF_KEY=$(awk '{print $11}' data-original/keytag)
SCONE_FSPF_TAG=$(awk '{print $9}' data-original/keytag)
export SCONE_FSPF_KEY SCONE_FSPF_TAG SCONE_FSPF="$DEMO/volume/fspf.pb"
echo "SCONE_FSPF_TAG=$SCONE_FSPF_TAG"
echo "SCONE_FSPF_KEY=$SCONE_FSPF_KEY"
step fspf show --tag volume/fspf.pb
step fspf show volume/fspf.pb
step fspf cat volume/fspf.pb /data/hello.txt
step fspf verify volume/fspf.pb

if [[ -e "$ROOT/target/release/libfspf_preload.so" ]] && command -v cc >/dev/null; then
  cat > example.c << 'EOT'
#include <stdio.h>
#include <stdlib.h>

void printfile(const char* fn) {
    FILE *fp = fopen(fn, "r");
    int c;
    if (!fp) { perror(fn); exit(1); }
    while((c=fgetc(fp))!=EOF){
        printf("%c",c);
    }
    fclose(fp);
}

int main() {
    printfile("/data/hello.txt");
    printfile("/data/world.py");
}
EOT
  step cc example.c -o example
  # /data does not exist on this host: the same program pointed at the kernel directory shows
  # what an unshielded program reads there, i.e. ciphertext (rendered with cat -v).
  sed "s#/data/#$DEMO/volume/#g" example.c > example-unshielded.c
  cc example-unshielded.c -o example-unshielded
  printf '\n\033[1m$ ./example   # without the shield (paths pointed at the kernel directory)\033[0m\n'
  ./example-unshielded | cat -v | head -c 300; echo
  step fspf run -- ./example
  step fspf run -- python3 /data/world.py
fi

printf '\n# tamper with one byte of the ciphertext: reads must fail\n'
printf '\x00' | dd of=volume/hello.txt bs=1 seek=30 conv=notrunc status=none
if fspf cat volume/fspf.pb /data/hello.txt; then echo "UNEXPECTED: tampered file was readable"; exit 1; fi
fspf verify volume/fspf.pb || echo "(verify exit status $? as expected)"
echo
echo "demo OK"
