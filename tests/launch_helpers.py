"""Run an app's real Hydra entry (`cli`) in this process with a command line, as `python -m` runs
it, and record what it would launch instead of launching it."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from pixio.runtime import launcher

REPO = Path(__file__).resolve().parents[1]
APPS = ("pretraining.train", "distillation.train", "evaluation.depth", "evaluation.semseg", "evaluation.knn", "evaluation.linear")  # fmt: skip


def run_app(
    module: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[Any, str]:
    """`python -m <module> args...` in this process: (exit code, 0 when `cli` returned; stderr)."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    handlers = list(logging.getLogger().handlers)  # Hydra configures logging: leave none behind
    capsys.readouterr()
    try:
        importlib.import_module(module).cli()
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        logging.getLogger().handlers[:] = handlers
    return code, capsys.readouterr().err


def record_submissions(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[Any, launcher.LauncherConfig]]:
    """Make `launcher=slurm` record (config, LauncherConfig) instead of calling submitit."""
    submitted: list[tuple[Any, launcher.LauncherConfig]] = []
    monkeypatch.setattr(launcher, "submit_slurm", lambda main, cfg, lc: submitted.append((cfg, lc)))
    return submitted


def record_launches(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make every app's entry record the validated config instead of launching anything."""
    launched: list[Any] = []
    monkeypatch.setattr(launcher, "launch", lambda main, cfg, overrides=None: launched.append(cfg))
    return launched


def app_args(tmp_path: Path, module: str) -> list[str]:
    """Overrides under which `module` passes its config check (existing data root and
    checkpoint, a fresh output_dir), so a test can add one mistake and see only that."""
    # A reference .pth records no architecture: validation checks that it exists, reads nothing.
    root, ckpt = tmp_path / "data", tmp_path / "encoder.pth"
    for folder in (root / "train", root / "val"):
        folder.mkdir(parents=True, exist_ok=True)
    ckpt.touch()
    args = [f"data.root={root}", f"output_dir={tmp_path / 'out'}", "logger=none"]
    if module == "distillation.train":
        return [*args, f"teacher.checkpoint={ckpt}"]
    if module.startswith("evaluation."):
        return [*args, f"encoder.checkpoint={ckpt}"]
    return args
