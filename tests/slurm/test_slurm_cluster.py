"""The launcher and pre-emption handling on a real SLURM cluster (scripts/slurm/local_cluster.sh).

Jobs run tests/slurm/fake_train.py as 1 node x 2 CPU tasks with gloo: a plain run, a run that
hits its real time limit, a run requeued from outside with `scontrol requeue`, and the plain
sbatch example (scripts/slurm/pretrain.sbatch) requeueing itself without submitit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import fake_train
import pytest
from omegaconf import OmegaConf
from slurm_jobs import all_logs, wait_done, wait_steps

from pixio.runtime.launcher import launch

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[2]


def assert_exact_run(out: Path, steps: int) -> list[int]:
    """Every step ran exactly once across restarts; returns the step each start resumed from."""
    assert (out / "steps.txt").read_text().split() == [str(i) for i in range(steps)]
    assert json.loads((out / "done.json").read_text())["steps"] == steps
    return [int(line.split()[0]) for line in (out / "starts.txt").read_text().splitlines()]


def slurm_cfg(tmp_path: Path, timeout_min: int = 5, signal_delay_s: int = 30, **fake):
    """A 1 node x 2 CPU-task submitit job running fake_train (gloo on CPU, even on a GPU node)."""
    launcher = dict(
        name="slurm",
        nodes=1,
        gpus_per_node=2,
        use_gpu=False,
        cpus_per_task=1,
        timeout_min=timeout_min,
        signal_delay_s=signal_delay_s,
        max_num_timeout=3,
        job_name="pixio-test",
    )
    return OmegaConf.create(
        {
            "output_dir": str(tmp_path / "run"),
            "launcher": launcher,
            "fake": {"device": "cpu", **fake},
        }
    )


def test_two_task_cpu_job_forms_a_gloo_group(tmp_path, job_env, capsys) -> None:
    cfg = slurm_cfg(tmp_path, steps=3, step_s=0.0)
    job = launch(fake_train.main, cfg)
    printed = capsys.readouterr().out
    folder = tmp_path / "run" / "slurm" / job.job_id
    assert f"submitted SLURM job {job.job_id}" in printed
    assert str(folder / f"{job.job_id}_0_log.out") in printed

    info = wait_done(job.job_id, folder, timeout=120)
    assert info["JobState"] == "COMPLETED", all_logs(folder)
    assert job.results() == [3, 3]  # both tasks ran main() to the end
    reports = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in reports] == [
        (0, 0, 2),
        (1, 1, 2),
    ]
    assert all(r["group"] and r["mean_rank"] == 0.5 for r in reports)  # gloo all-reduce
    assert {r["job_id"] for r in reports} == {job.job_id}

    sbatch = (folder / f"{job.job_id}_submission.sh").read_text()
    for flag in ("--ntasks-per-node=2", "--cpus-per-task=1", "--signal=USR2@30", "--requeue"):
        assert f"#SBATCH {flag}\n" in sbatch
    assert "gpus" not in sbatch  # use_gpu=false: runs on CPU-only nodes


def test_time_limit_signal_saves_requeues_and_resumes(tmp_path, job_env) -> None:
    # A 3-minute job asking for SIGUSR2 60 s ahead. SLURM sends it up to 60 s earlier than asked
    # (its timer's resolution), so it lands 60-120 s after the start: long after the handlers are in
    # place, even on a loaded machine. The first run is slow (3 s per step, 180 s in all) so it is
    # surely still training when signalled; later runs are fast and finish.
    steps = 60
    cfg = slurm_cfg(
        tmp_path, timeout_min=3, signal_delay_s=60, steps=steps, step_s=0.02, first_run_step_s=3.0
    )
    job = launch(fake_train.main, cfg)
    folder = tmp_path / "run" / "slurm" / job.job_id
    info = wait_done(job.job_id, folder, timeout=420)
    logs = all_logs(folder)
    assert info["JobState"] == "COMPLETED", logs
    restarts = int(info["Restarts"])
    assert restarts >= 1, logs

    starts = assert_exact_run(tmp_path / "run", steps)
    assert len(starts) == restarts + 1 and starts[0] == 0 and 0 < starts[1] < steps
    task0 = (folder / f"{job.job_id}_0_log.out").read_text()
    assert task0.count("this job is timed-out") == restarts
    assert task0.count(f"Requeued job {job.job_id}") == restarts  # once per signal
    saved = f"pre-empted (SIGUSR2) at step {starts[1]}: checkpoint saved, requeued job {job.job_id}"
    assert saved in task0


def test_scontrol_requeue_saves_and_slurm_restarts_once(tmp_path, job_env) -> None:
    steps = 40
    job = launch(fake_train.main, slurm_cfg(tmp_path, steps=steps, step_s=0.05))
    folder = tmp_path / "run" / "slurm" / job.job_id
    wait_steps(tmp_path / "run", 5, job.job_id)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    info = wait_done(job.job_id, folder, timeout=120)
    logs = all_logs(folder)
    assert info["JobState"] == "COMPLETED", logs
    assert info["Restarts"] == "1", logs  # SLURM's requeue only: SIGTERM does not requeue again

    starts = assert_exact_run(tmp_path / "run", steps)
    assert len(starts) == 2 and starts[1] >= 5
    assert f"pre-empted (SIGTERM) at step {starts[1]}: checkpoint saved, stopping" in logs
    assert "Requeued job" not in logs


def test_plain_sbatch_example_requeues_itself(tmp_path, job_env) -> None:
    # scripts/slurm/pretrain.sbatch as is, except: the fake module instead of pretraining.train,
    # and no GPUs. Its shape and time are overridden on the sbatch command line.
    script = (REPO / "scripts" / "slurm" / "pretrain.sbatch").read_text()
    script = script.replace("-m pretraining.train", "-m fake_train")
    script = re.sub(r"^#SBATCH --gpus-per-node=.*\n", "", script, flags=re.M)
    (tmp_path / "pretrain.sbatch").write_text(script)
    out = tmp_path / "run"
    env = {**job_env, "DATA_ROOT": str(tmp_path / "unused"), "OUTPUT_DIR": str(out)}
    env["PYTHON"] = sys.executable
    shape = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5"]
    logs = [f"--output={tmp_path}/%j.out", f"--error={tmp_path}/%j.err"]
    steps = 40
    submitted = subprocess.run(
        ["sbatch", "--parsable", *shape, *logs, str(tmp_path / "pretrain.sbatch")]
        + [f"fake.steps={steps}", "fake.step_s=0.05"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    wait_steps(out, 5, job_id)
    # The same signal as `--signal=USR2@120` ahead of the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    info = wait_done(job_id, tmp_path, timeout=120)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log

    starts = assert_exact_run(out, steps)
    assert len(starts) == 2 and starts[1] >= 5
    assert f"[pixio] job {job_id} (restart 0)" in log and f"[pixio] job {job_id} (restart 1)" in log
    assert (
        f"pre-empted (SIGUSR2) at step {starts[1]}: checkpoint saved, requeued job {job_id}" in log
    )
