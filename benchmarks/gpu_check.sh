#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: gpu_check/ (or $OUT when set)
# Installs the GPU extra into .venv-gpu, then runs benchmarks/gpu_check.py: the cuDNN path of
# the default model, a default and a seed-model run, graph vs keras_fit and float32 vs
# mixed_float16, sweep=max_batch for k=10,25 on the card and under device=k2200, and a probe
# driven into a real out-of-memory. About 8 minutes at most after the install; writes
# gpu_check.json and gpu_check.md (a step past its limit is recorded as "timeout").
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
python=$(command -v python3.11 || command -v python3)
[ -x .venv-gpu/bin/python ] || "$python" -m venv .venv-gpu
.venv-gpu/bin/pip install -q -e ".[gpu]" 2>&1 | grep -v "^WARNING" | tail -5 || true
.venv-gpu/bin/python -c "import tensorflow as tf; print('GPUs:', tf.config.list_physical_devices('GPU'))"
.venv-gpu/bin/python benchmarks/gpu_check.py --out "$out"   # each step has its own limit: 500 s in all
