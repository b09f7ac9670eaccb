"""The evaluation demos show a head that learns: the shipped `experiment=depth_demo` and
`semseg_demo` configs, run as they are (data built by evaluation.demo_data, random encoder
weights: the state of a fresh clone without `make demo`), reach d1 >= 50 % and mIoU >= 20 %.
Every seed is fixed (data, encoder, head, crops), so the numbers repeat run after run."""

from __future__ import annotations

import json

import pytest
import torch
from app_helpers import compose_eval

from evaluation.head_job import run_eval
from evaluation.report import DEMO_PREFIX, collect

THRESHOLDS = {"depth": ("d1", 50.0), "semseg": ("miou", 20.0)}


@pytest.fixture
def one_thread():
    """One intra-op thread: the demos' speed on a loaded 2-core machine (2 threads contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("app", ["depth", "semseg"])
def test_demo_head_learns(tmp_path, one_thread, app):
    out = tmp_path / "out"
    cfg = compose_eval(app, [
        f"experiment={app}_demo", f"data.root={tmp_path / 'data'}", f"output_dir={out}",
        f"encoder.checkpoint={tmp_path / 'no_make_demo.safetensors'}",  # random weights
    ])  # fmt: skip
    results = run_eval(cfg, app)
    metric, threshold = THRESHOLDS[app]
    best = results["best"][metric]
    print(f"{app} demo {metric}: {[round(e[metric], 2) for e in results['epochs']]}")
    assert best >= threshold and results["final"][metric] >= threshold
    assert results["demo"] is True and results["encoder"]["random_weights"] is True
    saved = json.loads((out / "results.json").read_text())
    assert saved["best"][metric] == best
    pictures = sorted(p.name for p in (out / "vis").iterdir())
    assert "train_crop_step20.png" in pictures and "val_0.png" in pictures
    rows, skipped = collect(tmp_path)
    assert not skipped and {r.dataset for r in rows} == {cfg.dataset.name}
    assert all(r.demo and r.cells()[1] == f"{DEMO_PREFIX}{cfg.dataset.name}" for r in rows)
