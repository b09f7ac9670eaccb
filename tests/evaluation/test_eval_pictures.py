"""The head tasks' pictures explain themselves: titled panels (input / prediction / ground
truth), the step and the image's metric in the title, a colour bar in metres for depth, a class
legend for segmentation, at a readable size; training batches carry the iteration they are for."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import pixio
from evaluation import vis
from evaluation.features import FrozenFeatures
from evaluation.head_job import IterationLoader
from evaluation.heads import build_head
from evaluation.task import DepthTask, SegmentationTask, Windows
from pixio.runtime.maploader import MapLoader
from pixio.runtime.vis import PANEL_PX, Panel, render_panels


@pytest.fixture
def captured(monkeypatch) -> list:
    """What evaluation.vis hands the renderer: (rows, title) per picture."""
    calls = []

    def fake(rows, title=""):
        calls.append((rows, title))
        return np.zeros((4, 4, 3), np.uint8)

    monkeypatch.setattr(vis, "render_panels", fake)
    return calls


def test_depth_picture_titles_shared_scale_in_metres_and_invalid_pixels(captured):
    target = torch.full((1, 8, 8), 3.0)
    target[0, :2] = 0.0  # no measurement
    target[0, 7, 7] = 7.5
    vis.depth_picture(torch.zeros(3, 8, 8), torch.full((1, 8, 8), 2.0), target, 10.0, "step 3")
    (rows, title), = captured  # fmt: skip
    assert title == "step 3"
    inp, pred, gt = rows[0]
    assert [p.title for p in rows[0]] == ["input", "prediction", "ground truth (black: no depth)"]
    assert inp.image.shape == (8, 8, 3) and inp.image.dtype == np.uint8
    for panel in (pred, gt):  # one colour scale, 0 to the farthest measured depth, in metres
        assert (panel.vmin, panel.vmax, panel.colorbar) == (0.0, 7.5, "depth (m)")
    assert np.array_equal(gt.image.mask, (target[0] == 0).numpy())  # drawn in the bad colour
    assert float(pred.image.max()) == 2.0


def test_segmentation_picture_legend_names_the_classes_shown(captured):
    names = ("wall", "sky", "road", "tree")
    pred = torch.tensor([[1, 1, 1, 2], [1, 1, 1, 2]])
    target = torch.tensor([[1, 1, 3, 3], [1, 255, 3, 3]])
    vis.segmentation_picture(torch.zeros(3, 2, 4), pred, target, 4, "t", names)
    (rows, _), = captured  # fmt: skip
    colours = vis.palette(4)
    legend = rows[0][2].legend
    # most frequent first over prediction and target: sky 10, tree 4, road 2; wall absent
    assert [name for name, _ in legend] == ["sky", "tree", "road"]
    assert np.array_equal(legend[0][1], colours[1])
    gt = rows[0][2].image
    assert gt[1, 1].tolist() == list(vis.IGNORE_COLOUR) and np.array_equal(gt[0, 0], colours[1])
    assert np.array_equal(rows[0][1].image[0, 3], colours[2])


def test_render_panels_is_readable():
    """Readable size and drawn content. Its cost (about 0.1-0.3 s for a row of panels on one
    core) is measured in docs, not asserted: a loaded machine would make a bound flaky."""
    image = (np.arange(32 * 48 * 3) % 251).astype(np.uint8).reshape(32, 48, 3)
    depth = np.ma.masked_array(np.linspace(0, 5, 32 * 48).reshape(32, 48), np.zeros((32, 48), bool))  # fmt: skip
    rows = [[Panel(image, "input"), Panel(depth, "depth", 0.0, 5.0, colorbar="m")]]
    picture = render_panels(rows, "a title")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.shape[0] >= PANEL_PX  # a 32-pixel crop is shown about 256 pixels high
    assert picture.shape[1] >= 2 * PANEL_PX * 48 / 32
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 100  # drawn, not blank


def tiny_task(kind: str, tmp_path):
    torch.manual_seed(0)
    encoder = pixio.build_encoder("pixio_vitt16", embed_dim=32, depth=2, num_heads=2, img_size=32)
    features = FrozenFeatures(encoder.eval(), [1])
    out = 1 if kind == "depth" else 3
    head = build_head("linear", 32, out)
    common = dict(windows=Windows(32, 21, 4), vis_dir=tmp_path / "vis", vis_images=1)
    if kind == "depth":
        return DepthTask(features, head, None, **common, min_depth=1e-3, max_depth=10.0)
    return SegmentationTask(features, head, None, **common, num_classes=3, class_names=("a", "b", "c"))  # fmt: skip


@pytest.mark.parametrize("kind", ["depth", "semseg"])
def test_task_pictures_name_the_step_and_the_metric(kind, tmp_path, monkeypatch):
    task = tiny_task(kind, tmp_path)
    seen = []
    monkeypatch.setattr(task, "picture", lambda sample, pred, title: seen.append(title) or np.zeros((2, 2, 3), np.uint8))  # fmt: skip
    modules = {"encoder": task.features, "head": task.head}
    target = {"depth": torch.rand(2, 1, 32, 32) * 8 + 1} if kind == "depth" else {"mask": torch.randint(0, 3, (2, 32, 32))}  # fmt: skip
    batch = {"image": torch.randn(2, 3, 32, 32), **target, "index": torch.tensor([0, 1]),
             "iteration": torch.tensor([4, 4])}  # fmt: skip
    pattern = r"d1 \d+\.\d %, abs_rel \d\.\d{3}, rmse \S+ m" if kind == "depth" else r"mIoU \d+\.\d % \(classes of this image\), pixel accuracy \d+\.\d %"  # fmt: skip
    assert list(task.pictures(modules, batch)) == ["train_crop"]
    assert re.fullmatch(rf"training crop, step 5: {pattern}", seen[-1]), seen[-1]
    first = {k: v[:1] for k, v in batch.items() if k != "iteration"}
    with torch.no_grad():  # as the trainer validates
        task.validate(modules, first)
    assert re.fullmatch(rf"validation image 0, the loaded weights: {pattern}", seen[-1])
    task.step(modules, batch)  # the head's iteration 4: 5 steps done
    with torch.no_grad():
        task.validate(modules, first)
    assert re.fullmatch(rf"validation image 0, step 5: {pattern}", seen[-1]), seen[-1]


def test_validation_pictures_are_written_with_titles(tmp_path):
    task = tiny_task("semseg", tmp_path)
    modules = {"encoder": task.features, "head": task.head}
    batch = {"image": torch.randn(1, 3, 40, 40), "mask": torch.randint(0, 3, (1, 40, 40)), "index": torch.tensor([0])}  # fmt: skip
    with torch.no_grad():
        task.validate(modules, batch)
    from PIL import Image

    with Image.open(tmp_path / "vis" / "val_0.png") as img:
        assert img.height >= PANEL_PX and img.width > 3 * PANEL_PX


def test_training_batches_carry_their_iteration_also_after_a_resume():
    data = [{"x": torch.tensor(float(i)), "index": i} for i in range(6)]
    plain = MapLoader(data, 2, seed=3)
    tagged = IterationLoader(data, 2, seed=3)
    for start in (0, 4):  # 3 batches per epoch: 4 is mid-epoch 1
        batches = zip(range(5), tagged.iterate(start), plain.iterate(start), strict=False)
        for n, batch, reference in batches:
            assert batch["iteration"].tolist() == [start + n] * 2
            assert torch.equal(batch["x"], reference["x"])
