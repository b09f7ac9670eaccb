"""Sliding-window inference: the reference's window grid, border padding, mean / sum, and the
batched path against the one-window-at-a-time path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.inference import sliding_window, window_boxes, window_starts


@pytest.mark.parametrize(
    "height, width, count",
    [(512, 683, 20), (375, 1242, 24), (426, 560, 12), (1024, 1024, 49), (100, 150, 1)],
)
def test_windows_per_image_match_the_reference(height, width, count):
    assert len(window_boxes(height, width)) == count


def test_window_starts():
    assert window_starts(683) == [0, 170, 340, 510, 680]
    assert window_starts(510) == [0, 170, 340]  # 510 is not < 510
    assert window_starts(511) == [0, 170, 340, 510]
    assert window_starts(100) == [0]


def by_hand(predict, image: torch.Tensor, reduce: str) -> torch.Tensor:
    """Independent reference: zero-pad the whole image so every window is a full crop, run the
    windows one by one, accumulate on the padded canvas and crop back."""
    _, h, w = image.shape
    rows, cols = window_starts(h), window_starts(w)
    big = torch.zeros(3, rows[-1] + 256, cols[-1] + 256)
    big[:, :h, :w] = image
    total, count = None, torch.zeros(1, *big.shape[1:])
    for r in rows:
        for c in cols:
            out = predict(big[None, :, r : r + 256, c : c + 256])[0]
            total = torch.zeros(out.shape[0], *big.shape[1:]) if total is None else total
            total[:, r : r + 256, c : c + 256] += out
            count[:, r : r + 256, c : c + 256] += 1
    total, count = total[:, :h, :w], count[:, :h, :w]
    return total / count if reduce == "mean" else total


def conv_model(out_channels: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, out_channels, 3, padding=1)
    ).eval()


@pytest.mark.parametrize("size", [(300, 421), (120, 200), (256, 256)])
def test_depth_and_segmentation_match_the_padded_canvas_reference(size):
    image = torch.randn(3, *size)
    model = conv_model(4)
    with torch.no_grad():
        depth = lambda w: torch.sigmoid(model(w)[:, :1]) * 10.0  # noqa: E731
        seg = lambda w: model(w).softmax(dim=1)  # noqa: E731
        for predict, reduce in ((depth, "mean"), (seg, "sum")):
            out = sliding_window(predict, image, window_batch=16, reduce=reduce)
            assert out.shape == (1 if reduce == "mean" else 4, *size)
            torch.testing.assert_close(out, by_hand(predict, image, reduce), rtol=0, atol=1e-5)


def test_batched_windows_equal_one_window_at_a_time():
    image, model = torch.randn(3, 300, 430), conv_model(3)
    with torch.no_grad():
        seg = lambda w: model(w).softmax(dim=1)  # noqa: E731
        one = sliding_window(seg, image, window_batch=1, reduce="sum")
        for batch in (4, 16):
            many = sliding_window(seg, image, window_batch=batch, reduce="sum")
            # oneDNN may pick another algorithm for another batch size: last-ulp differences
            torch.testing.assert_close(many, one, rtol=0, atol=1e-6)
    # a per-sample computation: bit-identical whatever the batch
    depth = lambda w: torch.sigmoid(w.mean(dim=1, keepdim=True)) * 80.0  # noqa: E731
    ref = sliding_window(depth, image, window_batch=1)
    assert torch.equal(sliding_window(depth, image, window_batch=5), ref)


def test_mean_sum_coverage_and_zero_padding_after_normalisation():
    image = torch.randn(3, 300, 430)
    seen = []

    def identity(windows: torch.Tensor) -> torch.Tensor:
        seen.append(windows.clone())
        return windows

    # every window predicts the pixel itself: the mean is the image, the padding is dropped
    torch.testing.assert_close(sliding_window(identity, image), image, rtol=0, atol=1e-6)
    windows = torch.cat(seen)
    assert windows.shape == (2 * 3, 3, 256, 256)  # rows 0, 170; cols 0, 170, 340
    last = windows[-1]  # rows 170..300, cols 340..430, the rest zeros (the mean colour)
    assert torch.equal(last[:, :130, :90], image[:, 170:, 340:])
    assert last[:, 130:].abs().sum() == 0 and last[:, :, 90:].abs().sum() == 0
    ones = lambda w: torch.ones(w.shape[0], 1, 256, 256)  # noqa: E731
    count = sliding_window(ones, image, reduce="sum")[0]
    assert count[0, 0] == 1 and count[200, 0] == 2 and count[200, 200] == 4 and count[200, 350] == 4
    # row 100: only the row-0 window; col 429: only the col-340 window (170 + 256 = 426)
    assert count[100, 429] == 1 and count[0, 300] == 1 and count[255, 255] == 4
    torch.testing.assert_close(sliding_window(ones, image, reduce="mean"), torch.ones(1, 300, 430))
