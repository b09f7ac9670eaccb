"""The real entry point on the local SLURM cluster: `experiment=demo launcher=slurm` as 1 node x 2
CPU tasks (gloo). The job finishes, both ranks ran to the end, checkpoint and metrics exist."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_jobs import all_logs, wait_done

from pixio.runtime import checkpointing

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[2]


def _demo_overrides(out: Path, iters: int, save_every: int) -> list[str]:
    return [
        "experiment=demo",
        "launcher=slurm",
        "launcher.nodes=1",
        "launcher.gpus_per_node=2",
        "launcher.use_gpu=false",
        "launcher.cpus_per_task=1",
        "launcher.timeout_min=20",
        "train.device=cpu",
        "train.epochs=1",
        f"train.iters_per_epoch={iters}",
        f"train.save_every_iters={save_every}",
        "train.log_every=1",
        "train.vis_every=0",
        "data.num_workers=0",
        "logger=none",
        f"output_dir={out}",
    ]


def _submit(overrides: list[str], job_env: dict[str, str]) -> str:
    """Run the real entry point with launcher=slurm; returns the job id it printed."""
    env = {**job_env, "PYTHONPATH": f"{REPO}:{job_env['PYTHONPATH']}"}
    submit = subprocess.run(
        [sys.executable, "-m", "pretraining.train", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", submit.stdout).group(1)
    assert f"{job_id}_0_log.out" in submit.stdout  # the log path is printed
    return job_id


def _metric_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_demo_runs_as_a_two_task_slurm_job(tmp_path, job_env) -> None:
    out = tmp_path / "demo"
    job_id = _submit(_demo_overrides(out, iters=6, save_every=3), job_env)
    folder = out / "slurm" / job_id

    info = wait_done(job_id, folder, timeout=300)
    assert info["JobState"] == "COMPLETED", all_logs(folder)
    for task in (0, 1):  # both ranks ran main() to the end
        with open(folder / f"{job_id}_{task}_result.pkl", "rb") as f:
            assert pickle.load(f)[0] == "success", all_logs(folder)
    assert (out / "checkpoint-last").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics
    assert all({"step", "loss", "lr"} <= m.keys() for m in metrics)


def test_requeued_pretraining_resumes_and_finishes_with_the_right_count(tmp_path, job_env) -> None:
    out, iters = tmp_path / "demo", 30
    job_id = _submit(_demo_overrides(out, iters=iters, save_every=100), job_env)
    folder = out / "slurm" / job_id
    deadline = time.time() + 240
    while len(_metric_steps(out)) < 3:  # inside the training loop
        assert time.time() < deadline, all_logs(folder)
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    info = wait_done(job_id, folder, timeout=400)
    logs = all_logs(folder)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    stopped = re.search(r"pre-empted \(SIGTERM\) at step (\d+): checkpoint saved", logs)
    assert stopped and 3 <= int(stopped.group(1)) < iters, logs
    step = int(stopped.group(1))
    resumed = f"resumed from {out / f'checkpoint-{step:08d}'} at iteration {step}"
    assert resumed in (out / "train.log").read_text(), logs
    assert checkpointing.load_checkpoint(out / "checkpoint-last")["iteration"] == iters
    assert _metric_steps(out) == list(range(1, iters + 1)), logs  # each step once, none lost
    assert (out / "encoder.safetensors").exists()
