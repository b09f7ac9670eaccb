"""Fixtures for the launcher / SLURM tests: the local cluster, and a job environment that can
import the fake training module (tests/slurm/fake_train.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
START_HINT = "start it with: sudo scripts/slurm/local_cluster.sh start"
BUSY_WAIT_S = 300  # how long the tests wait for a node another job holds


def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here (None when a node is up and usable)."""
    for tool in ("sinfo", "sbatch", "srun", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"SLURM client `{tool}` not found; {START_HINT}"
    state_conf = Path(os.environ.get("PIXIO_SLURM_STATE", "/tmp/pixio-slurm")) / "slurm.conf"
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists():
        if not state_conf.exists():
            return f"no SLURM configuration; {START_HINT}"
        os.environ["SLURM_CONF"] = str(state_conf)  # the local cluster's, when /etc has none
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15, check=False
            )
        except subprocess.TimeoutExpired:
            return f"sinfo timed out (controller down?); {START_HINT}"
        states = [s.rstrip("*~#") for s in out.stdout.split()]
        if out.returncode == 0 and any(s in ("idle", "mixed") for s in states):
            return None
        # A node busy with someone else's job is up: wait for it rather than skip.
        busy = out.returncode == 0 and any(s in ("allocated", "completing") for s in states)
        if not busy or time.monotonic() > deadline:
            detail = (out.stderr.strip() or " ".join(states) or "no nodes").splitlines()[0]
            waited = f", still after {BUSY_WAIT_S} s" if busy else ""
            return f"SLURM cluster not up ({detail}{waited}); {START_HINT}"
        time.sleep(2)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip (with the reason) unless a SLURM controller answers and a node is idle."""
    problem = _cluster_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture
def job_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment (also exported to SLURM jobs) in which `import fake_train` works."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(HERE) + (os.pathsep + path if path else ""))
    # A test run under torchrun or srun must not leak its ranks into the jobs it starts.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    return dict(os.environ)
