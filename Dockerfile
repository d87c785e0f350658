# syntax=docker/dockerfile:1
# xraycls container images. Research use only, not a medical device.
#
#   CPU (viewer + scoring, slim):  docker build --target cpu -t xraycls:cpu .
#   GPU (training + scoring):      docker build --target gpu -t xraycls:gpu .
#
#   Viewer:   docker run --rm -p 8501:8501 -v "$PWD/runs:/runs:ro" xraycls:cpu
#   Scoring:  docker run --rm -v "$PWD/runs:/runs:ro" -v "$PWD/in:/in:ro" -v "$PWD/out:/out" \
#                 xraycls:cpu predict /in --run /runs/demo --out /out/results.csv [--backend onnx]
#   Training: docker run --rm --gpus all --shm-size 8g -v "$PWD:/work" -w /work xraycls:gpu \
#                 train --config configs/swin_1024.yaml --set data.labels=/work/labels.csv
#   Several GPUs: ... xraycls:gpu train --config C.yaml --nproc 4   (torchrun + DDP/NCCL)
#   GPU check: docker run --rm --gpus all --entrypoint bash -v "$PWD/out:/out" \
#                 -v /path/to/shared/data:/data:ro -e XRAYCLS_SHARED_DATA=/data \
#                 xraycls:gpu benchmarks/gpu_check.sh /out/gpu_check.json
#
# Nothing is downloaded at run time: mount pretrained weights and run bundles. Both targets install
# the project the way .ci/run does (pip, pyproject's pinned torch/torchvision, extras), without the
# test tools; the CPU target takes torch from PyTorch's CPU wheel index (no CUDA libraries, ~1/5
# the size). The GPU target's CUDA runtime and cuDNN come with PyTorch's own CUDA wheels (the
# nvidia-* packages they pin), so they always match torch; the host needs only the NVIDIA driver
# and the NVIDIA container toolkit. Set GPU_BASE to build on another base (e.g. a CUDA image that
# ships Python 3.11).

ARG PYTHON_BASE=python:3.11-slim-bookworm
ARG GPU_BASE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- shared steps
FROM ${PYTHON_BASE} AS cpu-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XRAYCLS_APP=/opt/xraycls/app/streamlit_app.py \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --gid 10001 xraycls \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin xraycls
WORKDIR /opt/xraycls

# --------------------------------------------------------------------------- cpu: viewer + scoring
FROM cpu-base AS cpu
# CPU-only wheels first, so the project's pins (torch==2.14.1, torchvision==0.29.1) are already met.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY xraycls ./xraycls
COPY app ./app
COPY configs ./configs
# The project itself: its dependencies are pinned in pyproject.toml, which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[app,export]" \
    && python -c "import xraycls.cli, streamlit, onnxruntime"
USER 10001:10001
ENV XRAYCLS_DEVICE=cpu
EXPOSE 8501
# The viewer's own health endpoint; a container started for `predict` reports unhealthy after the
# start period (run it with --no-healthcheck).
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
ENTRYPOINT ["xraycls"]
CMD ["app", "--runs", "/runs", "--address", "0.0.0.0", "--device", "cpu"]

# --------------------------------------------------------------------------- gpu: training + scoring
FROM ${GPU_BASE} AS gpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XRAYCLS_APP=/opt/xraycls/app/streamlit_app.py \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --gid 10001 xraycls \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin xraycls
WORKDIR /opt/xraycls
COPY pyproject.toml README.md ./
COPY xraycls ./xraycls
COPY app ./app
COPY configs ./configs
COPY benchmarks/gpu_check.sh benchmarks/gpu_check.py ./benchmarks/
# PyPI's torch 2.14.1 for Linux x86_64 is the CUDA build; the extras add the viewer, Ray scoring,
# MLflow tracking and ONNX export.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[app,distributed,tracking,export]" \
    && python -c "import torch, xraycls.cli; assert torch.version.cuda, 'not a CUDA build of torch'"
USER 10001:10001
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
ENTRYPOINT ["xraycls"]
CMD ["--help"]
