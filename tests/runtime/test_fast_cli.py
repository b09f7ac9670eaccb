"""`--help`, `--cfg job` and a config error return before any heavy library is imported: each
app (pre-training, distillation, and the evaluation apps: depth, segmentation, k-NN, linear
probe; `evaluation.prepare` and `evaluation.report`, argparse) runs in a subprocess that reports,
as it exits, which of them `sys.modules` holds (the time they take is in docs/performance.md,
"Fast command lines"; a test asserts the import set, not a duration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
HEAVY = ("torch", "torchvision", "timm", "transformers", "webdataset", "submitit", "matplotlib", "wandb")  # fmt: skip

# Runs `python -m <module> <args>` and writes the heavy modules loaded at exit to argv[1].
REPORT = f"""
import atexit, json, runpy, sys
out, module = sys.argv[1], sys.argv[2]
heavy = {HEAVY!r}
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(m for m in heavy if m in sys.modules))))
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

CASES = {
    "pretraining.train": [
        ["--help"],
        ["experiment=demo", "--cfg", "job"],
        ["experiment=demo", "train.batch_size=0"],
        ["experiment=demo", "model.name=pixio_vitx16"],
        ["experiment=demo", "+train.epoch=1"],
        ["experiment=demo", "train.cpu_threads=0"],
        ["experiment=demo", "data.build_demo=false", "data.root=/nonexistent/shards"],
    ],
    "distillation.train": [
        ["--help"],
        ["experiment=distill_demo", "--cfg", "job"],
        ["experiment=distill_demo", "train.batch_size=0"],
        ["experiment=distill_demo", "students=[pixio_vitx16]"],
        ["experiment=distill_demo", "loss.cls=huber"],
        ["experiment=distill_demo", "mask_ratio=1.5"],
    ],
    "evaluation.depth": [
        ["--help"],
        ["experiment=depth_demo", "--cfg", "job"],
        ["experiment=depth_demo", "head.name=mlp"],
        ["experiment=depth_demo", "+eval.windows=2"],
        ["experiment=depth_demo", "eval.tta=rotate"],
        ["experiment=depth_demo", "train.cpu_threads=0"],
        ["experiment=depth_demo", "data.build_demo=false", "data.root=/nonexistent/nyuv2"],
    ],
    "evaluation.semseg": [
        ["--help"],
        ["experiment=semseg_demo", "--cfg", "job"],
        ["experiment=semseg_demo", "head.depth_output=bins"],
        ["experiment=semseg_demo", "eval.select=best"],
    ],
    "evaluation.knn": [
        ["--help"],
        ["experiment=knn_demo", "--cfg", "job"],
        ["experiment=knn_demo", "train.precision=fp8"],
        ["experiment=knn_demo", "+knn.metric=l2"],
        ["experiment=knn_demo", "train.cpu_threads=0"],
        ["experiment=knn_demo", "encoder.source=hub"],
        ["experiment=knn_demo", "data.build_demo=false", "data.root=/nonexistent/imagenet"],
    ],
    "evaluation.linear": [
        ["--help"],
        ["experiment=linear_demo", "--cfg", "job"],
        ["experiment=linear_demo", "head.lrs=[]"],
        ["experiment=linear_demo", "+linear.pool=cls"],
        ["experiment=linear_demo", "train.cpu_threads=0"],
        ["experiment=linear_demo", "data.crop_scale=[0.5,0.1]"],
        ["experiment=linear_demo", "linear.feature=max"],
    ],
}
PARAMS = [(app, args) for app, runs in CASES.items() for args in runs]


def run_reporting(app: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    """`python -m <app> args...` in a subprocess that writes the heavy modules it loaded to `out`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run(
            [sys.executable, "-c", REPORT, str(out), app, *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{app} {args} did not return within {TIMEOUT_S} s")


@pytest.mark.parametrize(("app", "args"), PARAMS, ids=[f"{a}:{' '.join(r)}" for a, r in PARAMS])
def test_help_cfg_and_config_errors_load_no_heavy_library(tmp_path: Path, app: str, args: list[str]) -> None:  # fmt: skip
    out = tmp_path / "heavy.json"
    done = run_reporting(app, [f"hydra.run.dir={tmp_path}", *args], out)
    if "--help" not in args and "--cfg" not in args:  # a config error: one line, exit 2
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.startswith("config error: "), done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert ("Powered by Hydra" in done.stdout) if "--help" in args else ("train:" in done.stdout)  # fmt: skip
    assert json.loads(out.read_text()) == [], f"{app} {args} imported heavy libraries"


# argparse command lines: --help (exit 0), and a mistake (one `error:` line, exit 1 or 2).
ARGPARSE_CASES = [
    ("evaluation.prepare", ["--help"], 0),
    ("evaluation.prepare", ["nyuv2", "/nonexistent/nyuv2"], 1),
    ("evaluation.prepare", ["imagenet", "/nonexistent"], 2),
    ("evaluation.report", ["--help"], 0),
]


@pytest.mark.parametrize(("app", "args", "code"), ARGPARSE_CASES, ids=[f"{a}:{' '.join(r)}" for a, r, _ in ARGPARSE_CASES])  # fmt: skip
def test_argparse_help_and_errors_load_no_heavy_library(tmp_path: Path, app: str, args: list[str], code: int) -> None:  # fmt: skip
    out = tmp_path / "heavy.json"
    done = run_reporting(app, args, out)
    assert done.returncode == code, done.stdout + done.stderr
    assert ("usage:" in done.stdout) if code == 0 else ("error:" in done.stderr), done.stderr
    assert json.loads(out.read_text()) == [], f"{app} {args} imported heavy libraries"
