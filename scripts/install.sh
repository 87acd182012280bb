#!/usr/bin/env bash
# Install adapterflow into ./.venv. Usage: scripts/install.sh [test]
# On machines without an NVIDIA GPU, the CPU build of torch goes in first: a bare `torch` requirement would pull
# a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -c constraints.txt torch  # the pin lives in constraints.txt only
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra:+[$extra]}"
