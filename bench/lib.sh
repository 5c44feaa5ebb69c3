# lib.sh - shared by the bench scripts (sourced; the caller defines `log`).

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
