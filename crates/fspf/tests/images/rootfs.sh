#!/usr/bin/env bash
# Build a test image's root file system from this machine's files (no registry needed):
#   rootfs.sh busybox DIR   Debian's static busybox as /bin/sh and its applets
#   rootfs.sh python DIR    python3 with its shared libraries and stdlib, an /app that reads
#                           /app/data.txt, and busybox for an unshielded `sh`
#   rootfs.sh big DIR       python plus a copy of /usr/share (40 000+ files, for bench/image.sh)
set -euo pipefail
kind=$1 out=$2
mkdir -p "$out"/{bin,etc,tmp,proc,sys,dev,run}
chmod 1777 "$out/tmp"
bb=$(command -v busybox)
if ! file -L "$bb" 2>/dev/null | grep -q 'statically linked' && ! ldd "$bb" 2>&1 | grep -q 'not a dynamic'; then
  echo "rootfs.sh: $bb is not static (install busybox-static)" >&2; exit 1
fi
cp "$bb" "$out/bin/busybox"
for a in sh cat ls echo sha256sum head wc; do ln -sf busybox "$out/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$out/etc/passwd"
printf 'root:x:0:\n' > "$out/etc/group"
[[ $kind == busybox ]] && exit 0
py=$(readlink -f /usr/bin/python3)
ver=$(basename "$py")
mkdir -p "$out/usr/bin" "$out/usr/lib" "$out/lib64" "$out/app"
cp -a "$py" "$out/usr/bin/$ver"
ln -sf "$ver" "$out/usr/bin/python3"
# Shared libraries, at the paths the loader looks them up.
ldd "$py" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
  [[ -f $lib ]] || continue
  mkdir -p "$out$(dirname "$lib")"
  cp -L "$lib" "$out$lib"
done
cp -a "/usr/lib/$ver" "$out/usr/lib/"
# The stdlib's extension modules may need more libraries (e.g. libffi, libssl): not needed by
# the tests, which import only pure-Python modules and those built into the interpreter.
cat > "$out/app/app.py" <<'PY'
with open('/app/data.txt') as f:
    print(f.read().strip())
PY
echo 'Hello World' > "$out/app/data.txt"
[[ $kind == python ]] && exit 0
if [[ $kind == big ]]; then
  cp -a /usr/share "$out/usr/"
  exit 0
fi
echo "rootfs.sh: unknown kind $kind" >&2; exit 2
