#!/usr/bin/env bash
# Installs mtrl with its test extras into ./.venv, then runs ruff, hadolint and the default test suite
# (toy-env unit tests plus a few real Meta-World tests; GPU tests skip without CUDA) on
# MTRL_TEST_WORKERS pytest-xdist workers (default 2; 0 runs it in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
.venv/bin/ruff check mtrl tests
.venv/bin/hadolint Dockerfile
.venv/bin/python -m pytest -m "not slow" -n "${MTRL_TEST_WORKERS:-2}" "$@"
