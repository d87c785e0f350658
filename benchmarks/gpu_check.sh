#!/usr/bin/env bash
# The prepared GPU check (issue 12): one command, one JSON, at most 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [OUT.json]        (default docs/gpu_check.json)
#
# Each configs/*_1024.yaml family for a few steps in bf16 and in fp16 + GradScaler (images/s, peak
# memory, no NaN), Swin-T fp32 vs bf16, Grad-CAM at 1024² on CUDA, and `predict` on the shared
# DICOM corpus ($XRAYCLS_SHARED_DATA/dicom or ../shared/data/dicom). See benchmarks/gpu_check.py;
# `python benchmarks/gpu_check.py --dry-run` runs the same code on the CPU with tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/gpu_check.json}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# Fail fast, before any model is built, when there is no GPU to check.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or finds no device); run it on a GPU machine" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PY has no CUDA-enabled torch (torch.cuda.is_available() is False)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2
# 8 minutes in all: the script stops starting new parts after 7 (--budget-s) and timeout ends it.
exec timeout --signal=TERM --kill-after=15 480 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s 420
