"""Data the evaluation cannot score stops the app with one `error:` line and no results: a
validation split without a single valid target (depth pngs all 0, masks all ignored), and a depth
png that cannot hold the dataset's encoding (read first in training, by a DataLoader worker)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from app_helpers import compose_eval, cpu_overrides, save_tiny_encoder, small_demo
from PIL import Image

from evaluation.datasets import read_split_list, scan_layout
from evaluation.depth import main as depth_main
from evaluation.metrics import DEPTH_METRICS
from evaluation.semseg import main as semseg_main
from evaluation.task import DepthTask, SegmentationTask, Windows
from pixio.runtime.job import DataError, error_line

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny encoder and small KITTI / ADE20K demo sets, copied per test before damage."""
    base = tmp_path_factory.mktemp("data_checks")
    encoder = save_tiny_encoder(base / "encoder.safetensors")
    return encoder, {name: small_demo(name, base / name) for name in ("kitti", "ade20k")}


def _copy(built, name: str, tmp_path):
    encoder, roots = built
    return encoder, shutil.copytree(roots[name], tmp_path / name)


def _run(app_main, app: str, encoder, root, out, capsys, **extra) -> str:
    """Run the app in this process; it must stop with exit code 1. Returns stderr."""
    values = {"train.epochs": 1, "train.batch_size": 4, "head": "linear", **extra}
    cfg = compose_eval(app, cpu_overrides(encoder, root, out, **values))
    with pytest.raises(SystemExit) as stop:
        app_main(cfg)
    assert stop.value.code == 1
    return capsys.readouterr().err


def _only_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_depth_validation_without_a_valid_pixel_stops_without_results(built, tmp_path, capsys):
    encoder, root = _copy(built, "kitti", tmp_path)
    for _, target in read_split_list(root / "splits" / "val.txt", root):
        empty = np.zeros_like(np.asarray(Image.open(target)))  # 16-bit, every pixel "no depth"
        Image.fromarray(empty).save(target)
    out = tmp_path / "run"
    err = _run(depth_main, "depth", encoder, root, out, capsys, dataset="kitti")
    line = _only_error_line(err)
    assert line.endswith(
        ": none of its 3 images has 10 or more valid depth pixels (in [0.001, 80.0] m): its "
        "depth pngs are empty or in another unit; check them with python -m evaluation.prepare "
        "DATASET ROOT --verify"
    )
    assert not (out / "results.json").exists() and not (out / "val_results.json").exists()
    assert line in (out / "train.log").read_text()


def test_segmentation_validation_with_every_pixel_ignored_stops(built, tmp_path, capsys):
    encoder, root = _copy(built, "ade20k", tmp_path)
    for _, target in scan_layout("ade20k", root, "val"):
        shape = np.asarray(Image.open(target)).shape
        Image.fromarray(np.zeros(shape, np.uint8)).save(target)  # raw 0 = "other" -> 255
    out = tmp_path / "run"
    err = _run(semseg_main, "semseg", encoder, root, out, capsys, dataset="ade20k")
    assert _only_error_line(err).endswith(
        ": every pixel of its 3 masks is 255 (ignored) once read: the masks are empty or "
        "data.label_format does not match them; check them with python -m evaluation.prepare "
        "DATASET ROOT --verify"
    )
    assert not (out / "results.json").exists() and not (out / "val_results.json").exists()


def _task(cls, **kwargs):
    head, optim = torch.nn.Identity(), None
    return cls(None, head, optim, Windows(), val_source="kitti val split (/d/val.txt)", **kwargs)


def test_depth_summary_names_the_split_when_no_image_counts():
    depth = _task(DepthTask, min_depth=1e-3, max_depth=80.0)
    totals = {k: torch.zeros((), dtype=torch.float64) for k in (*DEPTH_METRICS, "count")}
    with pytest.raises(DataError) as caught:
        depth.summarize({**totals, "samples": torch.tensor(5.0)})
    assert error_line(caught.value).startswith(
        "kitti val split (/d/val.txt): none of its 5 images has 10 or more valid depth pixels"
    )
    totals["count"] += 2  # two images count: their mean, not an error
    totals["d1"] += 150.0
    summary = depth.summarize({**totals, "samples": torch.tensor(5.0)})
    assert (summary["d1"], summary["images"], summary["samples"]) == (75.0, 2.0, 5.0)


def test_segmentation_summary_names_the_split_when_no_pixel_is_labelled():
    seg = _task(SegmentationTask, num_classes=3)
    stats = {k: torch.zeros(3, dtype=torch.float64) for k in ("intersection", "union", "target_area")}  # fmt: skip
    with pytest.raises(DataError, match=r"^kitti val split \(/d/val.txt\): every pixel of its 2 "):
        seg.summarize({**stats, "samples": torch.tensor(2.0)})
    stats["target_area"][1] = stats["union"][1] = 4  # four labelled pixels, none predicted
    assert seg.summarize({**stats, "samples": torch.tensor(2.0)})["miou"] == 0.0


def test_a_1_bit_depth_png_stops_training_with_one_line_naming_it(built, tmp_path, capsys):
    encoder, root = _copy(built, "kitti", tmp_path)
    target = read_split_list(root / "splits" / "train.txt", root)[0][1]
    Image.fromarray(np.asarray(Image.open(target)) > 0).save(target)  # a 1-bit png
    out = tmp_path / "run"  # read first by a DataLoader worker, in the first training batch
    err = _run(depth_main, "depth", encoder, root, out, capsys, **{"dataset": "kitti", "data.num_workers": 2})  # fmt: skip
    assert _only_error_line(err) == f"error: {target}: expected a 16-bit depth png, got 1-bit"


def test_raw_masks_read_as_reduced_are_announced_once_per_split(built, tmp_path):
    encoder, root = _copy(built, "ade20k", tmp_path)
    for split in ("train", "val"):
        for _, target in scan_layout("ade20k", root, split):  # no 150: nothing refuses them
            Image.fromarray(np.minimum(np.asarray(Image.open(target)), 149)).save(target)
    out = tmp_path / "run"
    values = {"dataset": "ade20k", "head": "linear", "train.epochs": 1, "train.batch_size": 4,
              "data.label_format": "reduced"}  # fmt: skip
    semseg_main(compose_eval("semseg", cpu_overrides(encoder, root, out, **values)))
    log = (out / "train.log").read_text()
    for split in ("train", "val"):
        assert log.count(f"ade20k {split} split: no 255 in the") == 1
    assert (out / "results.json").exists()  # a warning, not an error: the masks may be right
