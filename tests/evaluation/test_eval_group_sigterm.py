"""SIGTERM to an evaluation run's whole process group while it validates, with data-loader
workers for training and validation (both running then): the validation ends, the run saves
and exits 143, and the re-run ends with the head and results of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from app_helpers import cpu_overrides, read_json, save_tiny_encoder, small_demo
from signal_helpers import finish, run_module, running

from pixio.runtime import checkpointing

pytestmark = pytest.mark.slow


def test_depth_run_signalled_mid_validation_saves_and_resumes_to_the_same_result(tmp_path):
    checkpoint = save_tiny_encoder(tmp_path / "encoder.safetensors")
    root = small_demo("kitti", tmp_path / "kitti")
    extra = {"dataset": "kitti", "head": "linear", "data.num_workers": 1}

    def overrides(out):
        return cpu_overrides(checkpoint, root, out, **extra)

    part = tmp_path / "part"
    # Side by side: the uninterrupted run, and one whose group gets SIGTERM after the first
    # batch of the first validation (epoch 1 = 4 iterations of 2 images).
    with running("evaluation.depth", overrides(tmp_path / "full")) as full:
        stopped = run_module("evaluation.depth", overrides(part), group_sigterm="val:1")
        assert stopped.returncode == 143, stopped.stdout[-2000:] + stopped.stderr[-3000:]
        assert "DataLoader worker" not in stopped.stderr  # both loaders' workers lived on
        assert "pre-empted (SIGTERM) at step 4: checkpoint saved" in stopped.stdout
        meta = checkpointing.read_meta(part / "checkpoint-last")
        assert meta["iteration"] == 4 and meta["validation"]["last"]["epoch"] == 1  # it ended

        resumed = run_module("evaluation.depth", overrides(part))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        done = finish(full)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (
        checkpointing.load_checkpoint(out / "checkpoint-last", ("model",))["model"]["head"]
        for out in (tmp_path / "full", part)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_json(tmp_path / "full" / "results.json"), read_json(part / "results.json")
    for key in ("best", "final", "epochs"):
        assert ra[key] == rb[key], key
