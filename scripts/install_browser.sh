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

# shellcheck source=scripts/_apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/_apt.sh"
apt_install install_browser.sh chromium fonts-dejavu-core fonts-liberation fontconfig

if ! have_browser; then
  echo "install_browser.sh: chromium is still missing after apt-get install" >&2
  exit 1
fi
echo "install_browser.sh: $(chromium --version 2>/dev/null || echo chromium) ready"
