#!/usr/bin/env bash
# Pixio ViT-H/16 pre-training on ImageNet webdataset tars (SPEC section 4): 16 nodes x 8 GPUs,
# 64 images per GPU (global batch 8192), submitted to SLURM through submitit. The command prints
# the job id and log path and returns; re-running it with the same OUTPUT_DIR resumes.
#
#   DATA_ROOT=/datasets/imagenet-wds PARTITION=gpu ACCOUNT=myproject \
#     scripts/pretrain_vith16_imagenet.sh [extra Hydra overrides]
#
# Environment: DATA_ROOT (required), OUTPUT_DIR, PARTITION, ACCOUNT, QOS, CONSTRAINT,
# TIME_MIN (time limit per run; the job requeues itself), PYTHON.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
: "${DATA_ROOT:?set DATA_ROOT to the directory holding the ImageNet *train*.tar shards}"
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain_vith16_imagenet}
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  [ -x "$REPO/.venv/bin/python" ] && PYTHON=$REPO/.venv/bin/python
fi
# The SLURM job inherits this environment: it must import Pixio from this checkout too.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

args=(
  experiment=pretrain_vith16_imagenet
  launcher=slurm
  launcher.nodes=16
  launcher.gpus_per_node=8
  launcher.cpus_per_task=10
  train.batch_size=64
  "data.root=$DATA_ROOT"
  "output_dir=$OUTPUT_DIR"
)
[ -n "${PARTITION:-}" ] && args+=("launcher.partition=$PARTITION")
[ -n "${ACCOUNT:-}" ] && args+=("launcher.account=$ACCOUNT")
[ -n "${QOS:-}" ] && args+=("launcher.qos=$QOS")
[ -n "${CONSTRAINT:-}" ] && args+=("launcher.constraint=$CONSTRAINT")
[ -n "${TIME_MIN:-}" ] && args+=("launcher.timeout_min=$TIME_MIN")

exec "$PYTHON" -m pretraining.train "${args[@]}" "$@"
