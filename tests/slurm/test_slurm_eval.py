"""The evaluation apps on the local SLURM cluster: one depth run submitted with `launcher=slurm` as
1 node x 2 CPU tasks (gloo) finishes with results.json counting every image once; a two-value
segmentation sweep (`-m`) submits two jobs, each finishing in its own output_dir."""

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
from evaluation.demo_data import build_demo

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[2]
N_VAL = 3


def _tiny(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    encoder = pixio.build_encoder("pixio_vitt16", embed_dim=32, depth=4, num_heads=2)
    return pixio.save_encoder(encoder, tmp_path / "encoder.safetensors")


def _overrides(checkpoint: Path, tasks: int) -> list[str]:
    return [
        "launcher=slurm", "launcher.nodes=1", f"launcher.gpus_per_node={tasks}",
        "launcher.use_gpu=false", "launcher.cpus_per_task=1", "launcher.timeout_min=20",
        "encoder.name=pixio_vitt16", f"encoder.checkpoint={checkpoint}", "encoder.embed_dim=32",
        "encoder.depth=4", "encoder.num_heads=2", "head=linear", "data.num_workers=0",
        "data.crop_size=64", "eval.window=64", "eval.stride=42", "train.batch_size=2",
        "train.epochs=1", "train.precision=fp32", "train.device=cpu", "train.log_every=1",
        "train.vis_every=0", "logger=none",
    ]  # fmt: skip


def _submit(app: str, args: list[str], job_env: dict[str, str], jobs: int = 1) -> list[str]:
    """Run the real entry point; returns the job ids it printed."""
    env = {**job_env, "PYTHONPATH": f"{REPO}:{job_env['PYTHONPATH']}"}
    cmd = [sys.executable, "-m", f"evaluation.{app}", *args]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    ids = re.findall(r"submitted SLURM job (\d+)", run.stdout)
    assert len(ids) == jobs, run.stdout
    return ids


def _finished(job_id: str, out: Path, tasks: int) -> dict:
    folder = out / "slurm" / job_id
    info = wait_done(job_id, folder, timeout=400)
    assert info["JobState"] == "COMPLETED", all_logs(folder)
    for task in range(tasks):  # every rank ran main() to the end
        with open(folder / f"{job_id}_{task}_result.pkl", "rb") as f:
            assert pickle.load(f)[0] == "success", all_logs(folder)
    return json.loads((out / "results.json").read_text())


def test_depth_evaluation_runs_as_a_two_task_slurm_job(tmp_path, job_env) -> None:
    root = build_demo("kitti", tmp_path / "kitti", n_train=4, n_val=N_VAL, size=(64, 96))
    out = tmp_path / "run"
    args = [*_overrides(_tiny(tmp_path), 2), "dataset=kitti", f"data.root={root}",
            f"output_dir={out}"]  # fmt: skip
    (job_id,) = _submit("depth", args, job_env)
    results = _finished(job_id, out, tasks=2)
    # 3 images over 2 ranks (one padded repeat): each counted once.
    assert results["final"]["samples"] == N_VAL and results["final"]["images"] == N_VAL
    assert results["best"]["label"] == "best over epochs"
    assert results["config"]["launcher"]["name"] == "slurm"


def test_a_two_value_sweep_submits_one_job_per_value(tmp_path, job_env) -> None:
    for name in ("pascal", "loveda"):
        build_demo(name, tmp_path / name, n_train=2, n_val=2, size=(64, 96))
    root = tmp_path / "sweep"
    args = [*_overrides(_tiny(tmp_path), 1), "dataset=pascal,loveda",
            f"data.root={tmp_path}/${{dataset.name}}", f"output_root={root}"]  # fmt: skip
    ids = _submit("semseg", ["-m", *args], job_env, jobs=2)
    for job_id, name in zip(ids, ("pascal", "loveda"), strict=True):
        results = _finished(job_id, root / f"{name}_linear", tasks=1)
        assert (results["dataset"], results["head"]) == (name, "linear")
        assert results["final"]["samples"] == 2
