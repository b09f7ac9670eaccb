"""The evaluation demo sets: targets a frozen encoder's features can predict (each region's
class and depth follow its colour), a DEMO.json marker, and the demo runs' handling of the
folder (built, reused, rebuilt when of an older version, refused when unmarked)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from app_helpers import compose_eval
from PIL import Image

from evaluation import demo_data
from evaluation.common import validate_eval
from evaluation.datasets import build_dataset
from evaluation.demo_data import (
    ADE_LABELS,
    KIND_COLOURS,
    KIND_DEPTH,
    MARKER,
    demo_root_problem,
    ensure_demo,
    read_marker,
)
from pixio.runtime.config import ConfigError


def nearest_kind(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) pixels -> the kind whose colour is nearest, (H, W)."""
    dist = ((rgb[..., None, :].astype(np.float64) - KIND_COLOURS[: len(ADE_LABELS)]) ** 2).sum(-1)
    return dist.argmin(-1)


def test_classes_follow_the_colour_of_their_region(eval_demo):
    root = eval_demo("ade20k")
    val = build_dataset("ade20k", root, "val")
    for image, target in val.pairs:
        rgb = np.asarray(Image.open(image).convert("RGB"))
        raw = np.asarray(Image.open(target))
        labels = np.asarray(ADE_LABELS)[nearest_kind(rgb)]  # the class a colour stands for
        assert (labels == raw).mean() > 0.97  # all but JPEG ringing on region borders
        assert set(np.unique(raw)) == set(ADE_LABELS)  # every kind in every image


def test_depth_follows_the_colour_of_its_region(eval_demo):
    root = eval_demo("nyuv2")
    val = build_dataset("nyuv2", root, "val")
    for i, (image, _) in enumerate(val.pairs):
        rgb = np.asarray(Image.open(image).convert("RGB"))[45:471, 41:601]  # the Eigen crop
        depth = val[i]["depth"][0].numpy()
        kinds = nearest_kind(rgb)
        valid = (depth > 0) & (kinds < len(KIND_DEPTH))
        expected = 10.0 * np.asarray(KIND_DEPTH)[kinds[valid]]
        ratio = depth[valid] / expected  # the kind's depth within the +-8 % ramp
        assert np.mean(np.abs(ratio - 1) <= demo_data.RAMP + 0.01) > 0.97


def test_the_marker_records_the_build(eval_demo):
    marker = read_marker(eval_demo("kitti"))
    assert marker == {"demo": True, "dataset": "kitti", "version": demo_data.DEMO_VERSION,
                      "train": 8, "val": 3, "size": [240, 320], "seed": 0, "sbd_aug": False}  # fmt: skip


def test_demo_folders_are_reused_rebuilt_or_refused(tmp_path):
    root = tmp_path / "ade20k"
    ensure_demo("ade20k", root, 2, 1)
    first = (root / MARKER).stat().st_mtime_ns
    ensure_demo("ade20k", root, 2, 1)  # this version, these counts: used as is
    assert (root / MARKER).stat().st_mtime_ns == first
    record = json.loads((root / MARKER).read_text())
    (root / MARKER).write_text(json.dumps({**record, "version": 1}))  # an older demo set
    ensure_demo("ade20k", root, 2, 1)
    assert read_marker(root)["version"] == demo_data.DEMO_VERSION
    assert len(build_dataset("ade20k", root, "train")) == 2
    unmarked = tmp_path / "old"  # a demo set of an earlier release, or real data
    (unmarked / "images").mkdir(parents=True)
    problem = demo_root_problem(unmarked)
    assert problem.startswith(f"{unmarked} is not empty and holds no {MARKER}: ")
    with pytest.raises(FileExistsError, match="holds no DEMO.json"):
        ensure_demo("ade20k", unmarked, 2, 1)
    assert demo_root_problem(tmp_path / "absent") is None and demo_root_problem(root) is None


def test_a_demo_run_refuses_an_unmarked_folder_before_starting(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    cfg = compose_eval("semseg", ["experiment=semseg_demo", f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^data.root: {tmp_path / 'data'} is not empty and holds no DEMO.json"):  # fmt: skip
        validate_eval(cfg, "semseg")
