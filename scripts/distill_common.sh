# Sourced by the distillation launch scripts: the shared set-up of pretrain_common.sh (Python,
# PYTHONPATH, cluster overrides in CLUSTER_ARGS, run_command and DRY_RUN), then the overrides every
# recipe needs in DISTILL_ARGS: the teacher checkpoint, the data (JSON_ROOT for web tars) and the
# output folder.
# Usage: source distill_common.sh <experiment name> <data kind: imagenet | web>
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
: "${TEACHER_CKPT:?set TEACHER_CKPT to the weights of the 5B teacher (any format pixio.load_encoder reads)}"
: "${DATA_ROOT:?set DATA_ROOT to the directory holding the training .tar shards}"
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$1}
DISTILL_ARGS=(
  "experiment=$1"
  launcher=slurm
  launcher.nodes=16
  launcher.gpus_per_node=8
  launcher.cpus_per_task=10
  train.batch_size=64
  "teacher.checkpoint=$TEACHER_CKPT"
  "data.root=$DATA_ROOT"
  "output_dir=$OUTPUT_DIR"
)
if [ "$2" = web ]; then
  : "${JSON_ROOT:?set JSON_ROOT to the directory holding the per-shard curation statistics}"
  DISTILL_ARGS+=("data.json_root=$JSON_ROOT")
fi
true
