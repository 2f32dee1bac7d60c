#!/usr/bin/env bash
# Install a C++ compiler (Debian's g++): torch.compile's inductor backend generates and compiles
# C++ kernels on the CPU (tests/test_compile.py, benchmarks/compile_bench.py).
# Idempotent and quiet: does nothing when g++ (or c++) is already on PATH.
# Usage: bash scripts/install_cxx.sh   (as root, or with sudo available)
set -euo pipefail

if command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1; then
  exit 0
fi

# shellcheck source=scripts/_apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/_apt.sh"
apt_install install_cxx.sh g++
command -v g++ >/dev/null 2>&1
