#!/usr/bin/env bash
# The full frozen-encoder evaluation of one encoder (protocol: docs/reproduction.md), submitted to SLURM: depth
# (NYUv2, KITTI) and segmentation (ADE20K, Pascal VOC, LoveDA), each with the DPT and the linear
# head (10 jobs of 8 GPUs), k-NN and the linear probe on ImageNet-1k (1 job each). Once they have
# all left the queue it prints one table of every result beside the published numbers
# (python -m evaluation.report).
#
#   EVAL_DATA=/datasets/eval IMAGENET_ROOT=/datasets/in1k PARTITION=gpu \
#     scripts/run_all_evals.sh pixio_vith16 /ckpt/pixio_vith16.pth [OUTPUT_ROOT] [overrides...]
#
# Data: <dataset>_ROOT (NYUV2_ROOT, KITTI_ROOT, ADE20K_ROOT, PASCAL_ROOT, LOVEDA_ROOT), by default
# $EVAL_DATA/<dataset>; IMAGENET_ROOT for k-NN and the linear probe (folders train/ and val/).
# OUTPUT_ROOT defaults to outputs/eval/<MODEL>; each run writes OUTPUT_ROOT/<dataset>_<head>/
# results.json (k-NN: OUTPUT_ROOT/knn; linear probe: OUTPUT_ROOT/linear, experiment=linear_imagenet
# on one node of 8 GPUs: the global batch of 16384 by gradient accumulation). Extra Hydra overrides go to every app (e.g. encoder.module=student_pixio_vith16
# for a distilled student of a distillation checkpoint directory);
# EVAL_ARGS (depth and segmentation only), KNN_ARGS (k-NN only) and LINEAR_ARGS (linear probe
# only, e.g. LINEAR_ARGS='head.lrs=[0.05,0.1,0.2]' for an lr grid) add overrides for one kind.
# Environment: PARTITION, ACCOUNT, QOS, CONSTRAINT, TIME_MIN (see pretrain_common.sh), PYTHON,
# WAIT=0 to submit and return without waiting for the report, POLL_S (default 300), DRY_RUN=1 to
# print the seven app commands and the report's, and submit nothing.
# Re-running the script with the same OUTPUT_ROOT resumes unfinished runs; finished ones
# re-validate nothing and only rewrite their results. A baseline: MODEL is its encoder.name, plus
# its experiment (scripts/run_all_evals.sh vit_mae /ckpt/vit-mae-huge outputs/eval/mae_vith14
# experiment=baseline_mae_vith14); docs/evaluation.md, Baselines.
set -euo pipefail
source "$(dirname "$0")/pretrain_common.sh"
if [ $# -lt 2 ]; then
  sed -n '2,/^[^#]/{/^#/p}' "$0" >&2  # the header above
  exit 2
fi
MODEL=$1 CHECKPOINT=$2
shift 2
OUTPUT_ROOT=outputs/eval/$MODEL
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then
  OUTPUT_ROOT=$1
  shift
fi
root_of() {  # the data root of dataset $1: <NAME>_ROOT, else $EVAL_DATA/<name>
  local var
  var="$(echo "$1" | tr '[:lower:]' '[:upper:]')_ROOT"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  : "${EVAL_DATA:?set EVAL_DATA (holding <dataset>/ folders) or $var}"
  echo "$EVAL_DATA/$1"
}

COMMON=(launcher=slurm "encoder.name=$MODEL" "encoder.checkpoint=$CHECKPOINT" "${CLUSTER_ARGS[@]}")
JOBS=()
submit() {  # run one app command, echo its output, collect the SLURM job ids it printed
  local out
  if dry_run; then
    print_command "$PYTHON" "$@"
    return
  fi
  out=$("$PYTHON" "$@" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$out"
  JOBS+=($(echo "$out" | sed -n 's/.*submitted SLURM job \([0-9]*\).*/\1/p'))
}

read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
read -r -a KNN_EXTRA <<< "${KNN_ARGS:-}"
read -r -a LINEAR_EXTRA <<< "${LINEAR_ARGS:-}"
for dataset in nyuv2 kitti ade20k pascal loveda; do
  app=semseg
  case $dataset in nyuv2 | kitti) app=depth ;; esac
  submit -m "evaluation.$app" -m "dataset=$dataset" head=dpt,linear "data.root=$(root_of "$dataset")" \
    "output_root=$OUTPUT_ROOT" "${COMMON[@]}" ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"} "$@"
done
: "${IMAGENET_ROOT:?set IMAGENET_ROOT to the ImageNet-1k folders (train/ and val/)}"
submit -m evaluation.knn "data.root=$IMAGENET_ROOT" "output_dir=$OUTPUT_ROOT/knn" "${COMMON[@]}" \
  ${KNN_EXTRA[@]+"${KNN_EXTRA[@]}"} "$@"
submit -m evaluation.linear experiment=linear_imagenet "data.root=$IMAGENET_ROOT" \
  "output_dir=$OUTPUT_ROOT/linear" "${COMMON[@]}" ${LINEAR_EXTRA[@]+"${LINEAR_EXTRA[@]}"} "$@"

if dry_run; then
  print_command "$PYTHON" -m evaluation.report "$OUTPUT_ROOT"
  exit 0
fi
echo "submitted ${#JOBS[@]} jobs: ${JOBS[*]}"
if [ "${WAIT:-1}" = 0 ]; then
  echo "when they are done: $PYTHON -m evaluation.report $OUTPUT_ROOT"
  exit 0
fi
IDS=$(IFS=,; echo "${JOBS[*]}")
while [ -n "$(squeue -h -j "$IDS" -o %i 2>/dev/null)" ]; do
  sleep "${POLL_S:-300}"
done
"$PYTHON" -m evaluation.report "$OUTPUT_ROOT"
