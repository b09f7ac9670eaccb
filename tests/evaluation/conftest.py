"""Evaluation fixtures: tiny datasets in the real release layouts (evaluation.demo_data)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from evaluation.demo_data import build_demo


@pytest.fixture(scope="session")
def eval_demo(tmp_path_factory) -> Callable[..., Path]:
    """`eval_demo(name, sbd_aug=False)`: the root of a demo dataset (8 train, 3 val), built once
    per session. Shared: tests that change files use `eval_demo_copy`."""
    built: dict[tuple[str, bool], Path] = {}

    def get(name: str, sbd_aug: bool = False) -> Path:
        key = (name, sbd_aug)
        if key not in built:
            parent = tmp_path_factory.mktemp(f"eval_demo_{name}")
            built[key] = build_demo(name, parent / name, sbd_aug=sbd_aug)
        return built[key]

    return get


@pytest.fixture
def eval_demo_copy(eval_demo, tmp_path) -> Callable[..., Path]:
    """`eval_demo_copy(name, sbd_aug=False)`: a private copy of a demo dataset under tmp_path."""

    def copy(name: str, sbd_aug: bool = False) -> Path:
        return Path(shutil.copytree(eval_demo(name, sbd_aug), tmp_path / f"{name}_copy"))

    return copy
