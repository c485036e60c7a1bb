# mtrl on a GPU server: the README's install, in a container.
#   docker build -t mtrl .
#   docker run --gpus all -v $PWD/runs:/opt/mtrl/runs mtrl train --config configs/mt10_mtsac.yaml
FROM python:3.11-slim

# MuJoCo renders headless through EGL (only needed for videos; training does not render).
RUN apt-get update && apt-get install -y --no-install-recommends libegl1 libgl1 \
    && rm -rf /var/lib/apt/lists/*
ENV MUJOCO_GL=egl PYTHONUNBUFFERED=1

WORKDIR /opt/mtrl
COPY pyproject.toml README.md ./
COPY mtrl ./mtrl
COPY configs ./configs
# PyPI's Linux torch wheel is the CUDA build; `device: auto` uses the GPU when one is visible.
RUN pip install --no-cache-dir torch && pip install --no-cache-dir -e .

ENTRYPOINT ["mtrl"]
CMD ["--help"]
