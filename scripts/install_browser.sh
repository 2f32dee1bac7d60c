#!/usr/bin/env bash
# Install Debian's Chromium (plus fonts) for the headless browser test of the HTML report.
# Idempotent and quiet: does nothing when a chromium binary is already on PATH.
# Usage: bash scripts/install_browser.sh   (as root, or with sudo available)
set -euo pipefail

have_browser() {
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

have_fonts() {
  # fc-list comes with fontconfig, which chromium depends on.
  command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list 2>/dev/null | head -n 1)" ]
}

if have_browser && have_fonts; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_browser.sh: need root (or sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -qq -o Dpkg::Use-Pty=0 --no-install-recommends)
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install "${APT_OPTS[@]}" chromium fonts-dejavu-core fonts-liberation \
  fontconfig >/dev/null

if ! have_browser; then
  echo "install_browser.sh: chromium is still missing after apt-get install" >&2
  exit 1
fi
echo "install_browser.sh: $(chromium --version 2>/dev/null || echo chromium) ready"
