"""Depth metrics, the SiLog loss and mIoU against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.metrics import (
    depth_metric_sums,
    depth_metrics,
    intersection_and_union,
    miou,
    segmentation_stats,
    silog_loss,
    summarize_depth,
    summarize_segmentation,
)

LN2 = math.log(2.0)


def half_off_image() -> tuple[torch.Tensor, torch.Tensor]:
    """10 valid pixels (gt 2 m; pred 2 m on five, 4 m on five) and six invalid ones whose
    predictions would wreck every metric if they counted."""
    target = torch.tensor([[2.0] * 8, [2.0, 2.0, 0.0, -1.0, math.nan, 5e-4, 90.0, 0.0]])
    pred = torch.tensor([[2.0, 4.0] * 4, [2.0, 4.0, 1e3, 1e3, 1e3, 1e3, 1e3, 1e-9]])
    return pred, target


def test_depth_metrics_hand_computed():
    pred, target = half_off_image()
    m = depth_metrics(pred, target, min_depth=1e-3, max_depth=80.0)
    # ratio max(g/p, p/g) is 1 or 2: 2 > 1.25**3 = 1.95, so half the pixels pass every threshold
    expected = {
        "d1": 50.0, "d2": 50.0, "d3": 50.0,  # percent
        "abs_rel": 0.5,  # (5 * 0 + 5 * 2/2) / 10
        "sq_rel": 1.0,  # 5 * (2**2 / 2) / 10
        "rmse": math.sqrt(2.0),  # sqrt(5 * 4 / 10)
        "rmse_log": LN2 / math.sqrt(2.0),
        "log10": math.log10(2.0) / 2,
        "silog": LN2 * math.sqrt(3 / 8),  # sqrt(ln2^2 / 2 - 0.5 * (ln2 / 2)^2)
    }  # fmt: skip
    assert m is not None and set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-9), key


def test_depth_metrics_channel_dim_and_range_bounds():
    pred, target = half_off_image()
    assert depth_metrics(pred[None], target[None], 1e-3, 80.0) == depth_metrics(pred, target, 1e-3, 80.0)  # fmt: skip
    # Without max_depth the 90 m pixel (pred 1000 m, ratio 11) counts: 11 valid pixels.
    assert depth_metrics(pred, target, 1e-3)["d1"] == pytest.approx(5 / 11 * 100)
    # min and max are inclusive: a gt exactly at either bound counts.
    t = torch.full((12,), 1.0)
    t[0], t[1] = 1e-3, 80.0
    assert depth_metrics(t.clone(), t, 1e-3, 80.0)["d1"] == 100.0


def test_depth_metrics_skip_images_with_fewer_than_10_valid_pixels():
    target = torch.zeros(4, 4)
    target.view(-1)[:9] = 3.0
    assert depth_metrics(torch.ones(4, 4), target) is None  # 9 valid
    assert depth_metrics(torch.ones(4, 4), torch.zeros(4, 4)) is None  # all invalid
    target.view(-1)[9] = 3.0
    assert depth_metrics(torch.full((4, 4), 3.0), target)["abs_rel"] == 0.0  # 10 valid


def test_depth_metrics_zero_prediction_is_clamped_not_inf():
    target = torch.full((12,), 1.0)
    m = depth_metrics(torch.zeros(12), target, min_depth=1e-3)
    assert all(math.isfinite(v) for v in m.values())
    assert m["rmse_log"] == pytest.approx(-math.log(1e-3))


def test_depth_metric_sums_average_over_counted_images():
    pred, target = half_off_image()
    batch_pred = torch.stack([pred, torch.ones_like(pred)])
    batch_target = torch.stack([target, torch.zeros_like(target)])  # second: no valid pixel
    sums = depth_metric_sums(batch_pred[:, None], batch_target[:, None], 1e-3, 80.0)
    assert sums["count"].tolist() == [1.0, 0.0] and sums["d1"].tolist() == [50.0, 0.0]
    summary = summarize_depth({k: v.sum(0) for k, v in sums.items()})
    assert summary["images"] == 1.0
    assert summary["rmse"] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(summarize_depth({k: v.sum(0) * 0 for k, v in sums.items()})["d1"])


def test_silog_loss_pools_the_valid_pixels_of_the_batch():
    target = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pred = torch.tensor([[1.0, 2.0, 5.0], [4.0, 5.0, 5.0]])
    valid = target > 0
    loss = silog_loss(pred, target, valid)
    d = torch.tensor([0.0, -LN2, -2 * LN2])  # log(gt) - log(pred) over the 3 valid pixels
    expected = math.sqrt((d**2).mean() - 0.5 * d.mean() ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    per_image = (silog_loss(pred[:1], target[:1], valid[:1]) + silog_loss(pred[1:], target[1:], valid[1:])) / 2  # fmt: skip
    assert float(per_image) != pytest.approx(expected, rel=1e-3)  # pooled, not per-image mean


def test_silog_loss_without_valid_pixels_or_error_has_finite_zero_gradients():
    pred = torch.full((2, 3), 2.0, requires_grad=True)
    loss = silog_loss(pred, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros(2, 3))
    pred.grad = None
    perfect = silog_loss(pred, pred.detach().clone(), torch.ones(2, 3, dtype=torch.bool))
    perfect.backward()
    assert perfect.item() < 1e-5 and torch.isfinite(pred.grad).all()


def small_segmentation() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 2]])  # the 2 under 255 must not count
    return pred, target


def test_intersection_and_union_with_ignore_index():
    inter, union, area = intersection_and_union(*small_segmentation(), num_classes=4)
    # (target, pred) pairs counted: (0,0) (0,1) (1,1) (1,1) (2,1)
    assert inter.tolist() == [1, 2, 0, 0]
    assert union.tolist() == [2, 4, 1, 0]  # pred areas [1, 4, 0, 0] + target areas - inter
    assert area.tolist() == [2, 2, 1, 0]
    assert inter.dtype == union.dtype == area.dtype == torch.int64


def test_miou_leaves_out_classes_with_empty_union():
    inter, union, _ = intersection_and_union(*small_segmentation(), num_classes=4)
    # IoU 1/2, 2/4, 0/1; class 3 never occurs nor is predicted: out, not 0 (25) or 1 (50)
    assert miou(inter, union) == pytest.approx(100 / 3)
    assert math.isnan(miou(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)))


def test_miou_accumulates_over_the_set_not_per_image():
    pred, target = small_segmentation()
    pred2, target2 = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    stats = segmentation_stats(torch.stack([pred, pred2]), torch.stack([target, target2]), 4)
    assert stats["intersection"].shape == (2, 4)
    totals = {k: v.sum(0) for k, v in stats.items()}
    out = summarize_segmentation(totals)
    # set sums: inter [1, 8, 0, 0], union [2, 10, 1, 0] -> (0.5 + 0.8 + 0) / 3
    assert out["miou"] == pytest.approx(130 / 3)
    assert out["acc"] == pytest.approx(9 / 11 * 100)  # 9 correct of 11 counted pixels
    assert out["macc"] == pytest.approx((1 / 2 + 8 / 8 + 0) / 3 * 100)


def test_target_ids_outside_the_classes_are_an_error():
    with pytest.raises(ValueError, match=r"\[150\]"):
        intersection_and_union(torch.zeros(3), torch.tensor([0, 150, 255]), num_classes=150)
