#!/usr/bin/env bash
# Install a C++ compiler (Debian's g++): torch.compile's inductor backend generates and compiles
# C++ kernels on the CPU (tests/test_compile.py, benchmarks/compile_bench.py).
# Idempotent and quiet: does nothing when g++ (or c++) is already on PATH.
# Usage: bash scripts/install_cxx.sh   (as root, or with sudo available)
set -euo pipefail

if command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_cxx.sh: need root (or sudo) to apt-get install g++" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null
command -v g++ >/dev/null 2>&1
