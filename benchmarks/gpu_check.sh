#!/usr/bin/env bash
# Stage A's caption and VL/KL micro-batch steps (teacher cached and uncached) on llava-1.5-7b and -13b shapes with
# random bf16 weights and the CLAP encoder, xattn and prefix, with and without activation checkpointing, on one
# H100/H200 (no download, under 8 min: a time budget skips what would start late). Prints step time, the ratio to the
# bare frozen LLaVA, tokens/s, MFU (frozen-base FLOPs; 6N dense equivalent beside it) and peak memory; writes
# benchmarks/results/gpu_check.json. Extra arguments go to gpu_check.py (e.g. --batch-size 16, --shapes 7b, or
# --cpu-smoke to test the code path on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
