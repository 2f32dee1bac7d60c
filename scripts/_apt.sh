# Shared by the scripts/install_*.sh scripts (source it; it defines functions only).

# apt_install SCRIPT PACKAGE...: apt-get install PACKAGE... quietly, as root or through sudo; fails
# with a message naming SCRIPT and the first package when neither root nor sudo is available.
apt_install() {
  local script="$1"
  shift
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      echo "$script: need root (or sudo) to apt-get install $1" >&2
      exit 1
    fi
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o Dpkg::Use-Pty=0 \
    --no-install-recommends "$@" >/dev/null
}
