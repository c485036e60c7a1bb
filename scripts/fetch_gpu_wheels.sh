#!/usr/bin/env bash
# Downloads into .whl/ the wheels that scripts/gpu_check.sh installs on a GPU server without a package registry.
# That server has Python 3.12 with a CUDA build of torch (and numpy, scipy, tensorboard, pytest, ...) already installed;
# these are the packages mtrl needs beyond them, pinned to what pyproject.toml and metaworld pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
    metaworld==3.1.1 mujoco==3.3.0 gymnasium==1.4.0 farama-notifications==0.0.6 glfw==2.11.0 pyopengl==3.1.10 \
    omegaconf==2.4.0
du -sh .whl
ls .whl
