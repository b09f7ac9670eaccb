# Sourced by every launch script (scripts/*.sh, scripts/slurm/pretrain.sbatch): picks the Python,
# puts this checkout on PYTHONPATH (the SLURM job inherits the environment and must import Pixio
# from here too), turns the optional cluster variables into launcher overrides in the array
# CLUSTER_ARGS, and defines `run_command`, which runs a script's command or, with DRY_RUN=1,
# prints it and runs nothing.
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

# DRY_RUN=1 (any value but empty or 0): print each command instead of running it.
dry_run() { [ -n "${DRY_RUN:-}" ] && [ "$DRY_RUN" != 0 ]; }

# Prints its arguments as one shell-quoted line, "dry run: <command>", on stdout (a line that can
# be pasted into a shell).
print_command() {
  printf 'dry run:'
  printf ' %q' "$@"
  printf '\n'
}

# Runs its arguments as the script's last command (exec: its exit status is the script's); under
# DRY_RUN prints them instead and ends the script: nothing is submitted, run or created.
run_command() {
  if dry_run; then
    print_command "$@"
    exit 0
  fi
  exec "$@"
}
true
