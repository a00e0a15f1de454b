#!/usr/bin/env bash
# The GPU check: CUDA paths, precisions, resume, DDP over NCCL, DeepSpeed and the benchmark in
# one run of under five minutes on one GPU (or two), figures in one JSON (tests/gpu/check.py).
#   bash tests/gpu/check.sh [--out runs/gpucheck.json] [--budget-s 290] [other gpucheck options]
# On a machine without the package it installs it first (as tests/run.sh does).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c "import stackgan, accelerate, pytest" 2>/dev/null; then
    DS_BUILD_OPS=0 python3 -m pip install --quiet --disable-pip-version-check -e '.[dev,deepspeed]'
fi
exec python3 -m tests.gpu.check --out runs/gpucheck.json "$@"
