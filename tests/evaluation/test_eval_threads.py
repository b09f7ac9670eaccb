"""CPU threads of the evaluation apps, as pre-training's: each entry module sets OpenMP's passive
wait policy before torch loads (importing it loads no torch), and each app hands
`train.cpu_threads` to `run_job`, which sets and logs the job's thread count (k-NN's `train`
group has the key too, checked like the others')."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests_helpers import CONFIG_DIR

from pixio.runtime.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
ENTRY_POINTS = ("evaluation.depth", "evaluation.semseg", "evaluation.knn", "evaluation.linear", "evaluation.prepare", "evaluation.report")  # fmt: skip
# app -> (the module whose `run_job` the job calls, its demo experiment)
JOBS = {
    "depth": ("evaluation.head_job", "depth_demo"),
    "semseg": ("evaluation.head_job", "semseg_demo"),
    "knn": ("evaluation.knn_job", "knn_demo"),
    "linear": ("evaluation.linear_job", "linear_demo"),
}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_evaluation_entry_point_sets_the_policy_and_loads_no_torch(module: str) -> None:
    code = f"import os, sys, {module}; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "PIXIO_OMP"))}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"importing {module} did not finish within {TIMEOUT_S} s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PASSIVE", "False"]


class _Started(Exception):
    """Raised by the stand-in run_job: the job got as far as starting."""


def compose_app(app: str, *overrides: str):
    """configs/eval_<app>.yaml composed with `overrides` (the app's schema registered)."""
    import importlib

    from hydra import compose, initialize_config_dir

    importlib.import_module(f"evaluation.{app}")  # registers its schema
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=f"eval_{app}", overrides=list(overrides))


@pytest.mark.parametrize("app", sorted(JOBS))
def test_each_app_hands_train_cpu_threads_to_the_job(app: str, tmp_path: Path, monkeypatch) -> None:  # fmt: skip
    import importlib

    job_module, experiment = JOBS[app]
    seen = []

    @contextlib.contextmanager
    def run_job(output_dir: str, device: str, cpu_threads: object = "auto"):
        seen.append(cpu_threads)
        raise _Started
        yield

    monkeypatch.setattr(importlib.import_module(job_module), "run_job", run_job)
    cfg = compose_app(app, f"experiment={experiment}", f"data.root={tmp_path / 'data'}",
                      f"output_dir={tmp_path / 'out'}", "train.cpu_threads=3")  # fmt: skip
    with pytest.raises(_Started):
        importlib.import_module(f"evaluation.{app}").main(cfg)
    assert seen == ["3"]


def test_knn_checks_train_cpu_threads(tmp_path: Path) -> None:
    from evaluation.knn import validate_knn

    cfg = compose_app("knn", "experiment=knn_demo", f"data.root={tmp_path / 'data'}",
                      f"output_dir={tmp_path / 'out'}", "train.cpu_threads=many")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^train.cpu_threads: "):
        validate_knn(cfg)
