#!/usr/bin/env bash
# Pixio ViT-5B/16 pre-training on curated web tars (recipe: docs/reproduction.md): 32 nodes x 8 GPUs, 64 images
# per GPU (global batch 16384), filtered by the per-image statistics under JSON_ROOT (histogram
# score > 4.5, min side >= 320, soft sampling). Submitted to SLURM through submitit; the command
# prints the job id and log path and returns. Re-running it with the same OUTPUT_DIR resumes.
#
#   DATA_ROOT=/datasets/web-tars JSON_ROOT=/datasets/web-json PARTITION=gpu ACCOUNT=myproject \
#     scripts/pretrain_vit5b16_web.sh [extra Hydra overrides]
#
# Environment: DATA_ROOT, JSON_ROOT (required), OUTPUT_DIR, PARTITION, ACCOUNT, QOS, CONSTRAINT,
# TIME_MIN (time limit per run; the job requeues itself), PYTHON, DRY_RUN=1 (print the
# command, submit nothing).
set -euo pipefail
source "$(dirname "$0")/pretrain_common.sh"
: "${DATA_ROOT:?set DATA_ROOT to the directory holding the web .tar shards}"
: "${JSON_ROOT:?set JSON_ROOT to the directory holding the per-shard curation statistics}"
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain_vit5b16_web}
args=(
  experiment=pretrain_vit5b16_web
  launcher=slurm
  launcher.nodes=32
  launcher.gpus_per_node=8
  launcher.cpus_per_task=10
  train.batch_size=64
  "data.root=$DATA_ROOT"
  "data.json_root=$JSON_ROOT"
  "output_dir=$OUTPUT_DIR"
  "${CLUSTER_ARGS[@]}"
)
run_command "$PYTHON" -m pretraining.train "${args[@]}" "$@"
