#!/usr/bin/env bash
# Pixio's GPU check: one run of at most 8 minutes on one GPU (an H100 in mind) that records
# versions, the ViT-H/16 MAE step time and MFU (eager and compiled), the pre-training demo's
# exact resume, FSDP2 with compile / activation checkpointing / DCP, the evaluation and
# distillation demos, and JPEG decoding. Writes one JSON and one log and prints where.
#
#   scripts/gpu_check.sh                     # on the GPU (needs `make setup` first)
#   scripts/gpu_check.sh --cpu               # tiny sizes on the CPU; or GPU_CHECK_DEVICE=cpu
#   scripts/gpu_check.sh --list              # the stages; --stages a,b  --budget S  --timeout STAGE=S
#
# Paste the JSON into docs/performance.md, section "GPU" (see there). Everything else:
# scripts/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "error: $PY not found: run 'make setup' first (or set PYTHON=/path/to/python)" >&2
    exit 2
fi
exec "$PY" scripts/gpu_check.py "$@"
