# Sourced by the recipe launch scripts: picks the Python, puts this checkout on PYTHONPATH (the
# SLURM job inherits the environment and must import Pixio from here too), and turns the optional
# cluster variables into launcher overrides in the array CLUSTER_ARGS.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  [ -x "$REPO/.venv/bin/python" ] && PYTHON=$REPO/.venv/bin/python
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

CLUSTER_ARGS=()
[ -n "${PARTITION:-}" ] && CLUSTER_ARGS+=("launcher.partition=$PARTITION")
[ -n "${ACCOUNT:-}" ] && CLUSTER_ARGS+=("launcher.account=$ACCOUNT")
[ -n "${QOS:-}" ] && CLUSTER_ARGS+=("launcher.qos=$QOS")
[ -n "${CONSTRAINT:-}" ] && CLUSTER_ARGS+=("launcher.constraint=$CONSTRAINT")
[ -n "${TIME_MIN:-}" ] && CLUSTER_ARGS+=("launcher.timeout_min=$TIME_MIN")
true
