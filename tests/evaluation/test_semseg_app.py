"""The segmentation app end to end on CPU: the real entry point (`python -m evaluation.semseg`,
demo data built by the run itself in the ADE20K layout) completes and writes results.json with
best and final mIoU, the table, and pictures; and its statistics are the per-class sums."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from app_helpers import N_VAL, cpu_overrides, read_json

from evaluation.task import SegmentationTask, Windows

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_semseg_entry_point_builds_demo_data_trains_and_reports(tmp_path):
    # A demo run without its encoder file: random weights, allowed and recorded as such.
    checkpoint = tmp_path / "absent.safetensors"
    root, out = tmp_path / "ade20k", tmp_path / "run"
    overrides = cpu_overrides(checkpoint, root, out, **{"head": "linear", "data.build_demo": True,
                              "data.demo_train": 4, "data.demo_val": N_VAL, "optim.lr": 1e-2,
                              "train.vis_every": 2, "encoder.random_if_missing": True})  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "evaluation.semseg", "dataset=ade20k", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (root / "images" / "validation").is_dir()  # built in the release layout
    results = read_json(out / "results.json")
    assert (results["task"], results["dataset"], results["head"]) == ("semseg", "ade20k", "linear")
    assert results["encoder"]["random_weights"] and results["encoder"]["sha256"] is None
    assert results["metric"] == "miou" and len(results["epochs"]) == 2
    assert results["best"]["miou"] == max(e["miou"] for e in results["epochs"])
    assert results["final"] == {"label": "final epoch", **results["epochs"][-1]}
    assert all(e["samples"] == N_VAL and 0 <= e["miou"] <= 100 for e in results["epochs"])
    assert "semseg ade20k linear (pixio_vitt16)" in run.stdout and "final" in run.stdout
    # Validation pictures (the first eval.vis_images) and training crops every train.vis_every.
    pictures = sorted(p.name for p in (out / "vis").iterdir())
    assert pictures == ["train_crop_step2.png", "train_crop_step4.png", "val_0.png", "val_1.png"]


class _Perfect(torch.nn.Module):
    """A 'head' whose logits are the one-hot of a fixed label map (ignoring its features)."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.labels, self.k = labels, num_classes

    def forward(self, features, size):
        one_hot = torch.nn.functional.one_hot(self.labels, self.k).permute(2, 0, 1).float()
        return 10 * one_hot[None].expand(features.shape[0], -1, -1, -1)


def test_validation_statistics_are_per_class_intersections_and_unions():
    k, labels = 3, torch.tensor([[0, 0, 1, 1], [2, 2, 1, 1], [0, 0, 0, 0], [2, 2, 2, 2]])
    mask = labels.clone()
    mask[0, 0], mask[3, 3] = 255, 1  # one ignored pixel, one wrong prediction (2 for 1)
    head = _Perfect(labels, k)
    task = SegmentationTask(None, head, None, Windows(4, 4, 1), num_classes=k)
    modules = {"encoder": lambda x: x, "head": head}
    batch = {"image": torch.zeros(1, 3, 4, 4), "mask": mask[None], "index": torch.tensor([7])}
    stats = task.validate(modules, batch)
    assert stats["intersection"].tolist() == [[5, 4, 5]]
    assert stats["union"].tolist() == [[5, 5, 6]]
    totals = {**stats, "samples": torch.tensor(1.0)}
    assert task.summarize(totals)["miou"] == pytest.approx(100 * (1 + 4 / 5 + 5 / 6) / 3)
