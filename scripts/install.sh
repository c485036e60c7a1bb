#!/usr/bin/env bash
# Installs mtrl into ./.venv (created if missing). Usage: scripts/install.sh [extras], e.g. "test".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
# Without an NVIDIA GPU, take the CPU build of torch first: a bare "torch" requirement
# would otherwise pull several GB of CUDA packages. With a GPU, pip resolves the CUDA build.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
extras=${1:-}
"$py" -m pip install -q -e ".${extras:+[$extras]}"
