"""The real entry point on the local SLURM cluster: `experiment=demo launcher=slurm` as 1 node x 2
CPU tasks (gloo). The job finishes, both ranks ran to the end, checkpoint and metrics exist."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_jobs import all_logs, wait_done

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_as_a_two_task_slurm_job(tmp_path, job_env) -> None:
    out = tmp_path / "demo"
    overrides = [
        "experiment=demo",
        "launcher=slurm",
        "launcher.nodes=1",
        "launcher.gpus_per_node=2",
        "launcher.use_gpu=false",
        "launcher.cpus_per_task=1",
        "launcher.timeout_min=20",
        "train.device=cpu",
        "train.epochs=1",
        "train.iters_per_epoch=6",
        "train.save_every_iters=3",
        "train.log_every=1",
        "train.vis_every=0",
        "data.num_workers=0",
        "logger=none",
        f"output_dir={out}",
    ]
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
    folder = out / "slurm" / job_id
    assert f"{folder / job_id}_0_log.out" in submit.stdout  # the log path is printed

    info = wait_done(job_id, folder, timeout=300)
    assert info["JobState"] == "COMPLETED", all_logs(folder)
    for task in (0, 1):  # both ranks ran main() to the end
        with open(folder / f"{job_id}_{task}_result.pkl", "rb") as f:
            assert pickle.load(f)[0] == "success", all_logs(folder)
    assert (out / "checkpoint-last.pth").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics
    assert all({"step", "loss", "lr"} <= m.keys() for m in metrics)
