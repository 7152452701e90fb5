#!/usr/bin/env bash
# Stage A on a llava-1.5-7b-shaped model with random bf16 weights, on one H100/H200 (no download, <= 8 min).
# Prints step time, tokens/s, MFU and peak memory for xattn and prefix; writes benchmarks/results/gpu_check.json.
# Extra arguments go to gpu_check.py (e.g. --batch-size 16 --seq-len 512, or --cpu-smoke to test on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
