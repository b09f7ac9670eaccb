#!/usr/bin/env bash
# Pixio distillation (recipe: docs/reproduction.md): the frozen 5B teacher into the L and B students (no masking, drop path 0.1),
# in one run, on curated web tars (filters of the 5B pre-training recipe; needs JSON_ROOT): 16 nodes x 8 GPUs, 64 images per GPU,
# submitted to SLURM through submitit. The command prints the job id and log path and returns;
# re-running it with the same OUTPUT_DIR resumes every student.
#
#   TEACHER_CKPT=/ckpt/pixio_vit5b16.pth DATA_ROOT=/datasets/... JSON_ROOT=/datasets/web-json PARTITION=gpu \
#     scripts/distill_vitl16_vitb16_web.sh [extra Hydra overrides]
#
# Environment: TEACHER_CKPT, DATA_ROOT (required), JSON_ROOT (required), OUTPUT_DIR, PARTITION, ACCOUNT, QOS,
# CONSTRAINT, TIME_MIN (time limit per run; the job requeues itself), PYTHON, DRY_RUN=1 (print the
# command, submit nothing).
set -euo pipefail
source "$(dirname "$0")/distill_common.sh" distill_vit5b16_to_vitl16_vitb16_web web
run_command "$PYTHON" -m distillation.train "${DISTILL_ARGS[@]}" "${CLUSTER_ARGS[@]}" "$@"
