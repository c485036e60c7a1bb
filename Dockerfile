# mtrl for GPU servers (and CPU-only ones): the documented install (pinned torch, then the package
# with the dependency pins of pyproject.toml) in a slim image. The host needs the NVIDIA driver and
# container toolkit only: the torch wheel brings its own CUDA runtime. TORCH_BUILD picks the wheel:
# cu126 (default; driver >= 525.60.13), cu130 or cu132 (driver >= 580), cpu (no GPU).
#   docker build -t mtrl .                                  # or: --build-arg TORCH_BUILD=cu130
#   mkdir -p runs && docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD/runs:/opt/mtrl/runs" \
#       mtrl train --config configs/mt10_mtsac.yaml
# docs/container.md: the driver table, building without a Docker daemon (buildah, podman), Apptainer.
# tests/test_dockerfile.py keeps this file in sync with pyproject.toml, scripts/install.sh and that page.
ARG TORCH_BUILD=cu126

# --- builder: a virtual environment with mtrl and its dependencies --------------------------------
FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch at the version scripts/install.sh pins, from the PyTorch index of the chosen build (PyPI's
# Linux wheel is the CUDA 13.0 one, whose driver many clusters do not have yet).
ARG TORCH_BUILD
RUN pip install torch==2.13.0 --index-url "https://download.pytorch.org/whl/${TORCH_BUILD}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mtrl ./mtrl
# Not editable: the package is installed from this copy, with the dependency pins it declares.
# Optional extras (e.g. --build-arg EXTRAS=sweep) come from pyproject.toml as well.
ARG EXTRAS=""
# DL3013 asks for pinned pip packages: the pins are pyproject.toml's, read from the copied source.
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS:+[$EXTRAS]}"

# --- runtime: the venv, the presets and the OpenGL loader libraries; no compilers or build tools ---
FROM python:3.11-slim-bookworm
# glvnd's EGL/GL loaders for headless MuJoCo rendering (evaluation videos). The NVIDIA EGL vendor
# library itself is mounted by the container toolkit, which does so only for the graphics capability.
# The CPU build renders in software instead (OSMesa: run it with MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa).
# DL3008 asks for pinned apt versions: Debian replaces them with security updates, so exact pins would
# break later builds; the bookworm tag fixes the release.
ARG TORCH_BUILD
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglvnd0 libegl1 libgl1 libopengl0 \
    && if [ "$TORCH_BUILD" = cpu ]; then apt-get install -y --no-install-recommends libosmesa6; fi \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics
COPY --from=builder /opt/venv /opt/venv

RUN groupadd --gid 1000 mtrl \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin mtrl \
    && mkdir -p /opt/mtrl/runs \
    && chown -R 1000:1000 /opt/mtrl
WORKDIR /opt/mtrl
COPY --chown=1000:1000 configs ./configs
# Runs default to runs/<preset>-<date>-<time> under the working directory: keep them on a volume.
VOLUME /opt/mtrl/runs
USER 1000:1000
ENTRYPOINT ["mtrl"]
CMD ["--help"]
