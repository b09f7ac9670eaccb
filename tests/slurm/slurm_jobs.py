"""Helpers for tests that submit SLURM jobs: job state, waiting, and logs for failure messages."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def all_logs(folder: Path) -> str:
    files = sorted([*folder.rglob("*.out"), *folder.rglob("*.err")])
    return "\n".join(f"== {p}\n{p.read_text()[-4000:]}" for p in files)


def wait_done(job_id: str, logs: Path, timeout: float) -> dict[str, str]:
    """Wait until the job reached a final state; on time-out cancel it and show its logs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} still {info['JobState']} after {timeout} s\n{all_logs(logs)}")


def wait_steps(out: Path, n: int, job_id: str, timeout: float = 60) -> None:
    """Wait until the job has run `n` steps (so it is inside its training loop)."""
    deadline = time.time() + timeout
    steps = out / "steps.txt"
    while not steps.exists() or len(steps.read_text().split()) < n:
        if time.time() > deadline:
            subprocess.run(["scancel", job_id], check=False)
            pytest.fail(f"job {job_id} did not reach step {n}: {job_info(job_id)['JobState']}")
        time.sleep(0.2)


def metric_steps(out: Path) -> list[int]:
    """The steps a real job logged to `out/metrics.jsonl` so far (one per line)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def wait_metric_steps(out: Path, n: int, logs: Path, timeout: float = 240) -> None:
    """Wait until a real job has logged `n` steps (it is inside its training loop)."""
    deadline = time.time() + timeout
    while len(metric_steps(out)) < n:
        if time.time() > deadline:
            pytest.fail(f"no {n} steps logged in {out} after {timeout} s\n{all_logs(logs)}")
        time.sleep(0.1)
