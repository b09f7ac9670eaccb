"""The distillation entry point on the local SLURM cluster: `experiment=distill_demo
launcher=slurm` as 1 node x 2 CPU tasks (gloo), with a tiny teacher the test writes (the demo's
own teacher would first need the pre-training demo). Both ranks finish, both students are
checkpointed and exported."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from slurm_jobs import all_logs, wait_done

import pixio

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[2]
TEACHER = dict(img_size=128, embed_dim=32, depth=2, num_heads=2)
STUDENTS = ("pixio_vitt16", "pixio_vits16")


def _overrides(teacher: Path, out: Path) -> list[str]:
    return [
        "experiment=distill_demo", "launcher=slurm", "launcher.nodes=1",
        "launcher.gpus_per_node=2", "launcher.use_gpu=false", "launcher.cpus_per_task=1",
        "launcher.timeout_min=20", f"teacher.checkpoint={teacher}", "teacher.build_demo=false",
        *(f"teacher.{k}={v}" for k, v in TEACHER.items()), "train.device=cpu", "train.epochs=1",
        "train.iters_per_epoch=6", "train.save_every_iters=3", "train.log_every=1",
        "train.vis_every=0", "data.num_workers=0", "logger=none", f"output_dir={out}",
    ]  # fmt: skip


def test_distill_demo_runs_as_a_two_task_slurm_job(tmp_path, job_env) -> None:
    torch.manual_seed(0)
    teacher = pixio.save_encoder(
        pixio.build_encoder("pixio_vitt16", **TEACHER), tmp_path / "teacher.safetensors"
    )
    out = tmp_path / "distill"
    env = {**job_env, "PYTHONPATH": f"{REPO}:{job_env['PYTHONPATH']}"}
    submit = subprocess.run(
        [sys.executable, "-m", "distillation.train", *_overrides(teacher, out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", submit.stdout).group(1)
    folder = out / "slurm" / job_id

    info = wait_done(job_id, folder, timeout=300)
    assert info["JobState"] == "COMPLETED", all_logs(folder)
    for task in (0, 1):  # both ranks ran main() to the end
        with open(folder / f"{job_id}_{task}_result.pkl", "rb") as f:
            assert pickle.load(f)[0] == "success", all_logs(folder)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for name in STUDENTS:
        assert f"loss/student_{name}" in records[-1]
        assert (out / f"encoder-{name}.safetensors").exists()
