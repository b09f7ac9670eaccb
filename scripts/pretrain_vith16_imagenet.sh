#!/usr/bin/env bash
# Pixio ViT-H/16 pre-training on ImageNet webdataset tars (recipe: docs/reproduction.md): 16 nodes x 8 GPUs,
# 64 images per GPU (global batch 8192), submitted to SLURM through submitit. The command prints
# the job id and log path and returns; re-running it with the same OUTPUT_DIR resumes.
#
#   DATA_ROOT=/datasets/imagenet-wds PARTITION=gpu ACCOUNT=myproject \
#     scripts/pretrain_vith16_imagenet.sh [extra Hydra overrides]
#
# Environment: DATA_ROOT (required), OUTPUT_DIR, PARTITION, ACCOUNT, QOS, CONSTRAINT,
# TIME_MIN (time limit per run; the job requeues itself), PYTHON, DRY_RUN=1 (print the
# command, submit nothing).
set -euo pipefail
source "$(dirname "$0")/pretrain_common.sh"
: "${DATA_ROOT:?set DATA_ROOT to the directory holding the ImageNet *train*.tar shards}"
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pretrain_vith16_imagenet}
args=(
  experiment=pretrain_vith16_imagenet
  launcher=slurm
  launcher.nodes=16
  launcher.gpus_per_node=8
  launcher.cpus_per_task=10
  train.batch_size=64
  "data.root=$DATA_ROOT"
  "output_dir=$OUTPUT_DIR"
  "${CLUSTER_ARGS[@]}"
)
run_command "$PYTHON" -m pretraining.train "${args[@]}" "$@"
