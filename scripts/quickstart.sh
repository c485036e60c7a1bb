#!/usr/bin/env bash
# Installs mtrl into ./.venv and trains the quickstart preset (MT1 reach-v3 on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/mtrl train --config configs/quickstart.yaml "$@"
