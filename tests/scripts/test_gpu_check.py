"""scripts/gpu_check.sh end to end: the budget, per-stage failures and time limits, the JSON and
the log, and the CPU mode's stages with their figures checked against pixio.models.flops."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pixio.models.flops import ViTSpec, mae_flops

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
ALL_STAGES = ["env", "mae_eager", "mae_compiled", "pretrain_resume", "fsdp2", "trainer_keys",
              "depth_demo", "semseg_demo", "knn_demo", "distill_demo", "jpeg", "mae_compiled_model"]  # fmt: skip


def run_check(*args: str, timeout: int = 150, cpu_env: bool = False) -> tuple[subprocess.CompletedProcess, dict]:  # fmt: skip
    """Run the shell entry point; (process, the JSON report)."""
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DEVICE"}
    if cpu_env:
        env["GPU_CHECK_DEVICE"] = "cpu"
    try:
        proc = subprocess.run([str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"gpu_check.sh {' '.join(args)} did not finish in {timeout} s: {exc.stdout}")
    out = Path(args[args.index("--out") + 1])
    assert f"results -> {out / 'gpu_check.json'}" in proc.stdout, proc.stdout + proc.stderr
    assert f"log     -> {out / 'gpu_check.log'}" in proc.stdout
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_out_of_budget_skips_every_stage(tmp_path):
    proc, report = run_check("--budget", "3", "--out", str(tmp_path), cpu_env=True)
    assert proc.returncode == 0, proc.stderr
    assert report["mode"] == "cpu" and list(report["stages"]) == ALL_STAGES
    for result in report["stages"].values():
        assert result["status"] == "skipped" and result["reason"].startswith("out of time")
    assert (tmp_path / "gpu_check.log").exists()


def test_bad_arguments_name_the_culprit(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--stages", "env,mae", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "--stages: unknown ['mae']" in proc.stderr
    proc = subprocess.run([str(SCRIPT), "--timeout", "env=soon", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "--timeout 'env=soon'" in proc.stderr


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks what the GPU mode records without a GPU"
)
def test_failures_and_time_limits_are_recorded(tmp_path):
    """The GPU mode on a machine without CUDA: env records the versions and fails in one line;
    a stage past its own limit is stopped and recorded; the driver goes on and exits 1."""
    proc, report = run_check("--stages", "env,jpeg", "--timeout", "jpeg=1", "--out", str(tmp_path))
    assert proc.returncode == 1
    env, jpeg = report["stages"]["env"], report["stages"]["jpeg"]
    assert env["status"] == "failed" and env["error"].startswith(
        "RuntimeError: CUDA is not available"
    )
    assert (
        env["metrics"]["torch"] == torch.__version__ and env["metrics"]["cuda_available"] is False
    )
    assert jpeg == {**jpeg, "status": "failed", "error": "timed out after 1 s"}
    assert jpeg["seconds"] < 1 + 10 + 5  # the limit, the TERM grace period, slack
    assert "CUDA is not available" in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.slow
def test_cpu_mode_stages(tmp_path):
    """--cpu: versions, the MAE benchmark (FLOPs from pixio.models.flops, throughput consistent
    with the step time) and FSDP2 on a one-rank gloo group with a DCP save, load and RNG round
    trip that continues exactly."""
    proc, report = run_check("--cpu", "--stages", "env,mae_eager,fsdp2", "--out", str(tmp_path))
    stages = report["stages"]
    assert proc.returncode == 0, {k: v.get("error") for k, v in stages.items()}
    assert stages["env"]["metrics"]["torch"] == torch.__version__
    mae = stages["mae_eager"]["metrics"]
    tiny = ViTSpec.named("pixio_vitt16", depth=2)
    expected = mae_flops(tiny, ViTSpec(64, 2), 128, 128, mask_ratio=0.75, mask_grid=4)
    assert mae["gflops_per_image"]["train"] == pytest.approx(expected.train / 1e9)
    median_s = mae["step_ms"]["median"] / 1e3
    assert mae["images_per_s"] == pytest.approx(mae["batch"] / median_s, rel=0.01)
    assert mae["tflops"] == pytest.approx(expected.train * mae["batch"] / median_s / 1e12, abs=0.01)
    assert mae["mfu"] is None  # no peak is known for a CPU
    assert mae["encoder_forward_ms"]["median"] > 0 and mae["profile"]["cpu_events"] > 0
    fsdp = stages["fsdp2"]["metrics"]
    assert fsdp["backend"] == "gloo" and fsdp["compiled"] == {}  # the CPU plan does not compile
    trip = fsdp["eager"]
    assert trip["rng_round_trip"] is True and trip["weight_max_diff"] == 0
    assert trip["losses_resumed"] == trip["losses_uninterrupted"]
