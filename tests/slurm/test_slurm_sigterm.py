"""`scancel --signal=TERM` of a running pre-training job on the local SLURM cluster, with a
data-loader worker: SLURM signals every process of the step, the worker included; the job saves
and stops, and a re-submission resumes and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import re
import subprocess

import pytest
from signal_helpers import REPO, assert_same_mae, finish, running, write_web_shard
from slurm_jobs import all_logs, metric_steps, wait_done, wait_metric_steps
from tests_helpers import CPU_OVERRIDES, compose_pretrain

from pixio.runtime import checkpointing
from pixio.runtime.launcher import launch
from pretraining.train import main

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

ITERS = 60  # long enough for the signal to land mid-run (0.05-0.5 s per iteration)
SLURM = ["launcher=slurm", "launcher.nodes=1", "launcher.gpus_per_node=1", "launcher.use_gpu=false",
         "launcher.cpus_per_task=1", "launcher.timeout_min=20"]  # fmt: skip


def _overrides(shards, out, *launcher: str) -> list[str]:
    local = [o for o in CPU_OVERRIDES if not o.startswith(("launcher", "data.num_workers"))]
    return [
        *local, *launcher, f"data.root={shards}", "data.kind=web", "data.shuffle_buffer=8",
        "data.num_workers=1", "train.epochs=4", f"train.iters_per_epoch={ITERS // 4}",
        "train.save_every_iters=1000", f"output_dir={out}",
        # auto gives 2 threads here and SLURM's cpus-per-task (1) in the job: one count for
        # both, as bit-exact equality on the CPU needs the same thread count.
        "train.cpu_threads=1",
    ]  # fmt: skip


def _submit(shards, out) -> str:
    """The real job submitted from here (the CLI's `launch`, without a second interpreter)."""
    return launch(main, compose_pretrain(_overrides(shards, out, *SLURM))).job_id


def test_scancel_sigterm_saves_and_the_resubmitted_job_equals_an_uninterrupted_run(
    tmp_path, job_env, monkeypatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{job_env['PYTHONPATH']}")  # what the job imports
    shards = write_web_shard(tmp_path / "shards" / "000000.tar", 24).parent
    out = tmp_path / "job"
    # The uninterrupted run, here, beside the two jobs.
    with running(
        "pretraining.train", _overrides(shards, tmp_path / "full", "launcher=local")
    ) as full:
        job_id = _submit(shards, out)
        folder = out / "slurm" / job_id
        wait_metric_steps(out, 3, folder)
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        wait_done(job_id, folder, timeout=300)
        logs = all_logs(folder)
        stopped = re.search(
            r"pre-empted \(SIGTERM\) at step (\d+): checkpoint saved, stopping", logs
        )
        assert stopped and "DataLoader worker" not in logs, logs
        step = int(stopped.group(1))
        assert 3 <= step < ITERS
        assert checkpointing.read_meta(out / "checkpoint-last")["iteration"] == step

        again = _submit(shards, out)
        info = wait_done(again, out / "slurm" / again, timeout=300)
        assert info["JobState"] == "COMPLETED", all_logs(out / "slurm" / again)
        resumed = f"resumed from {out / f'checkpoint-{step:08d}'} at iteration {step}"
        assert resumed in (out / "train.log").read_text()
        done = finish(full)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_mae(tmp_path / "full", out, ITERS)
    assert metric_steps(out) == list(range(1, ITERS + 1))  # each step once
