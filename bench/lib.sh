# lib.sh - shared by the bench scripts (sourced first: REPO=<repo root>; . "$REPO/bench/lib.sh").

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# install_missing CMD=PKG...: apt-get install the package of every command that is missing (as
# root, on Debian); a package that cannot be installed is logged and whatever needs it skipped.
install_missing() {
  local -a need=()
  local cp
  for cp in "$@"; do
    command -v "${cp%%=*}" >/dev/null 2>&1 || need+=("${cp#*=}")
  done
  ((${#need[@]})) || return 0
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -qq update || true
  local p
  for p in "${need[@]}"; do
    apt-get -y -qq install "$p" >/dev/null || log "could not install $p (skipping what needs it)"
  done
}

# release_build: build the release workspace (unless SKIP_BUILD is set) and set FSPF to its fspf
# binary (REPO is the caller's).
release_build() {
  FSPF="$REPO/target/release/fspf"
  if [[ -z ${SKIP_BUILD:-} ]]; then
    (cd "$REPO" && cargo build --release --workspace -q) || die "cargo build --release failed"
  fi
  [[ -x $FSPF && -f $REPO/target/release/libfspf_preload.so ]] || die "build with 'cargo build --release --workspace'"
}

# real_python: set PY to the python3 interpreter binary (not a pyenv launcher script).
real_python() {
  command -v python3 >/dev/null || die "python3 required"
  PY=$(realpath "$(python3 -c 'import sys; print(sys.executable)')")
}

# encrypted_volume W V: a new fspf W/fspf.pb with / not protected and V an encrypted kernel region
# (embed path = kernel path), its key in W/key and its tag in W/tag.
encrypted_volume() {
  local w=$1 v=$2 f="$1/fspf.pb" out
  "$FSPF" create "$f" >/dev/null
  "$FSPF" addr "$f" / --kernel / --not-protected >/dev/null
  "$FSPF" addr "$f" "$v" --encrypted --kernel "$v" >/dev/null
  out=$("$FSPF" encrypt "$f")
  awk '{print $11}' <<<"$out" > "$w/key"
  awk '{print $9}' <<<"$out" > "$w/tag"
}
