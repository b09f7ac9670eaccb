"""Test-time augmentation against predictions averaged by hand, the per-class and per-depth-bin
tables against hand-computed counts, the bins depth output's formula, and the device-memory
estimate of a grid of heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.heads import BINS_EPS, bin_centres, bins_to_depth, build_head
from evaluation.inference import predict_with_tta, sliding_window, tta_passes
from evaluation.memory import STATE_BYTES, estimate_memory, saved_activation_bytes
from evaluation.metrics import (
    class_table,
    depth_bin_edges,
    depth_bin_sums,
    depth_bin_table,
    segmentation_stats,
)
from evaluation.task import DepthTask, Windows


def conv_model(out_channels: int) -> nn.Module:
    """Not mirror-symmetric (an asymmetric kernel), so a flip changes its output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, (3, 5), padding=(1, 2)), nn.ReLU(), nn.Conv2d(6, out_channels, 3, padding=1)).eval()  # fmt: skip


class ConvEncoder(nn.Module):
    """A stand-in frozen encoder: one (B, 4, H / 8, W / 8) map (a linear head reads the last)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 8, stride=8)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.conv(images)]


def depth_task(tta: str = "none", **kwargs) -> DepthTask:
    torch.manual_seed(2)
    head = build_head("linear", 2, kwargs.pop("out", 1))  # in_channels 4 = 2 x "embed_dim" 2
    windows = Windows(32, 21, 3, tta, (0.5, 1.0, 1.25))
    return DepthTask(None, head.eval(), None, windows, min_depth=1e-3, max_depth=10.0, **kwargs)


def test_tta_flip_is_the_average_with_the_flipped_input_run_flipped_back():
    task, encoder = depth_task("flip"), ConvEncoder().eval()
    image = torch.randn(3, 40, 70)
    with torch.no_grad():

        def predict(w):
            return task.window_output(task.head_output(task.head, encoder(w), w.shape[-2:]))

        got = task.predict_image(predict, image)
        plain = sliding_window(predict, image, 32, 21, 3, "mean")
        mirrored = sliding_window(predict, image.flip(-1), 32, 21, 3, "mean").flip(-1)
    assert torch.equal(got, (plain + mirrored) / 2)
    assert not torch.equal(plain, mirrored)  # the flip does change the prediction


def test_multiscale_resizes_predicts_resizes_back_and_averages_every_scale_and_flip():
    model, image = conv_model(2), torch.randn(3, 30, 44)

    def run(x, reduce):
        return sliding_window(lambda w: model(w).softmax(1), x, 16, 10, 4, reduce)

    passes = tta_passes("multiscale", (0.5, 1.5))
    assert passes == [(0.5, False), (0.5, True), (1.5, False), (1.5, True)]
    with torch.no_grad():
        got = predict_with_tta(run, image, passes, "sum")
        by_hand = torch.zeros(2, 30, 44)
        for size in ((15, 22), (45, 66)):
            for flip in (False, True):
                x = image.flip(-1) if flip else image
                x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
                out = F.interpolate(run(x, "mean")[None], size=(30, 44), mode="bilinear", align_corners=False)[0]  # fmt: skip
                by_hand += out.flip(-1) if flip else out
        assert torch.allclose(got, by_hand / 4, rtol=0, atol=1e-6)
        # No augmentation is the reference path itself: the summed probabilities.
        assert torch.equal(predict_with_tta(run, image, tta_passes("none"), "sum"), run(image, "sum"))  # fmt: skip


def test_per_class_iou_equals_a_hand_computed_confusion():
    target = torch.tensor([[0, 0, 1, 255], [1, 1, 2, 2], [0, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 0], [1, 0, 2, 2], [0, 2, 1, 2]])
    k = 4  # class 3 never occurs nor is predicted: no IoU, left out of mIoU
    confusion = np.zeros((k, k), dtype=np.int64)  # rows: target, columns: prediction
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != 255:
            confusion[t, p] += 1
    stats = segmentation_stats(pred[None], target[None], k)
    rows = class_table(stats, ("wall", "floor", "sky", "car"))
    for c, row in enumerate(rows):
        tp, area, predicted = confusion[c, c], confusion[c].sum(), confusion[:, c].sum()
        union = area + predicted - tp
        assert row["class"] == c and row["name"] == ("wall", "floor", "sky", "car")[c]
        assert row["pixels"] == area
        assert row["iou"] == (pytest.approx(100 * tp / union) if union else None)
        assert row["acc"] == (pytest.approx(100 * tp / area) if area else None)
    assert [r["iou"] is None for r in rows] == [False, False, False, True]


def test_per_depth_bin_table_equals_hand_counts():
    target = torch.tensor([[0.5, 1.5, 2.5, 9.9], [0.0, 4.0, 1.0, 10.0], [3.3, 3.3, 3.3, 3.3]])
    pred = torch.tensor([[0.6, 1.0, 2.4, 5.0], [7.0, 4.1, 1.3, 9.0], [3.0, 5.0, 3.3, 2.0]])
    edges = depth_bin_edges(10.0, 5)  # 0, 2, 4, 6, 8, 10
    sums = depth_bin_sums(pred[None], target[None], edges, 1e-3, 10.0)
    table = depth_bin_table({k: v.sum(0) for k, v in sums.items()}, edges)
    assert [(r["from"], r["to"]) for r in table] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    for row in table:
        inside = [(p, g) for p, g in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True)
                  if g > 0 and (row["from"] <= g < row["to"] or g == row["to"] == 10.0)]  # fmt: skip
        assert row["pixels"] == len(inside)
        if not inside:
            assert row["d1"] is None and row["abs_rel"] is None
            continue
        d1 = sum(max(p / g, g / p) < 1.25 for p, g in inside) / len(inside) * 100
        assert row["d1"] == pytest.approx(d1) and row["abs_rel"] == pytest.approx(np.mean([abs(p - g) / g for p, g in inside]))  # fmt: skip
    assert [r["pixels"] for r in table] == [3, 5, 1, 0, 2]  # 0.0 has no ground truth


@pytest.mark.parametrize("norm", ["linear", "softmax"])
def test_bins_output_is_the_normalised_weighted_sum_of_bin_centres(norm):
    centres = bin_centres(1e-3, 10.0)
    assert centres.shape == (256,) and centres[0] == pytest.approx(1e-3) and centres[-1] == 10.0
    assert torch.allclose(
        centres[1:] - centres[:-1], torch.full((255,), (10.0 - 1e-3) / 255), atol=1e-5
    )
    logits = torch.randn(2, 256, 3, 4)
    got = bins_to_depth(logits, centres, norm)
    for b, i, j in ((0, 0, 0), (1, 2, 3), (0, 1, 2)):
        v = logits[b, :, i, j].double()
        w = torch.softmax(v, 0) if norm == "softmax" else (v.clamp_min(0) + BINS_EPS) / (v.clamp_min(0) + BINS_EPS).sum()  # fmt: skip
        assert got[b, 0, i, j].item() == pytest.approx(float((w * centres.double()).sum()), rel=1e-5)  # fmt: skip
    assert bool(((got >= 1e-3) & (got <= 10.0)).all())  # a convex combination of the centres


def test_the_bins_depth_is_formed_at_the_heads_resolution_then_upsampled():
    task = depth_task(depth_output="bins", bins_norm="linear", out=256)
    assert task.out_channels == 256 and task.pred_channels == 1
    features = ConvEncoder()(torch.randn(2, 3, 32, 48))
    with torch.no_grad():
        got = task.head_output(task.head, features, (32, 48))
        depth = bins_to_depth(
            task.head(features, None), bin_centres(1e-3, 10.0), "linear"
        )  # (2, 1, 4, 6)
        by_hand = F.interpolate(depth, size=(32, 48), mode="bilinear", align_corners=True)
    assert got.shape == (2, 1, 32, 48) and torch.allclose(got, by_hand, rtol=1e-6, atol=1e-6)
    assert torch.equal(task.window_output(got), got)  # no sigmoid on top


@pytest.mark.parametrize("kind", ["linear", "dpt"])
def test_saved_activations_on_the_meta_device_equal_a_real_forwards(kind):
    def measure(device):
        with torch.device(device):
            torch.manual_seed(0)
            head = build_head(kind, 8, 3)
            features = [torch.randn(2, 16, 4, 4) for _ in range(4 if kind == "dpt" else 1)]
        return saved_activation_bytes(head, features, (64, 64))

    assert measure("meta") == measure("cpu")
    if kind == "linear":  # BatchNorm's input, the conv's input, BatchNorm's mean and inverse std
        assert measure("cpu") == 2 * (2 * 16 * 4 * 4) * 4 + 2 * 16 * 4


def test_the_estimate_adds_up_and_says_how_many_heads_fit():
    args = dict(batch=4, crop=64, window=64, window_batch=2, patch=16, val_pixels=64 * 96)
    one = estimate_memory("dpt", 8, 10_000, 1, heads=1, **args)
    four = estimate_memory("dpt", 8, 10_000, 1, heads=4, **args)
    params = sum(p.numel() for p in build_head("dpt", 8, 1).parameters())
    assert one.head_params == params and one.per_head_state == params * (STATE_BYTES + 2)
    assert one.encoder_weights == 10_000 * 2  # bf16 blocks
    assert four.total - one.total == 3 * one.per_head  # K heads: K x state and activations
    budget = four.total
    assert four.max_heads(budget) == 4 and four.max_heads(budget - 1) == 3
    fp32 = estimate_memory("dpt", 8, 10_000, 1, heads=1, bf16=False, **args)
    assert fp32.encoder_weights == 40_000 and fp32.per_head_state == params * STATE_BYTES
