#!/usr/bin/env bash
# Installs mtrl into ./.venv (created if missing). Usage: scripts/install.sh [extras], e.g. "test".
# The package is installed editable, so code changes need no reinstall: when pyproject.toml has not
# changed since the last install of the same extras, this returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
extras=${1:-}
stamp=".venv/.mtrl-installed${extras:+-${extras//,/-}}"
digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && "$py" -c "import mtrl" 2>/dev/null; then
  exit 0
fi
# Without an NVIDIA GPU, take the CPU build of torch first: a bare "torch" requirement
# would otherwise pull several GB of CUDA packages. With a GPU, pip resolves the CUDA build.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
"$py" -m pip install -q -e ".${extras:+[$extras]}"
echo "$digest" > "$stamp"
