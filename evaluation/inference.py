"""Sliding-window inference on full images (docs/reproduction.md, "Protocol details").

Window 256, stride int(256 * 2 / 3) = 170; rows and columns start at 0, 170, 340, ... while
< H (resp. W). A window running past the border is cut and zero-padded to 256 x 256 after
normalisation (the pad is the mean colour); its padded part is dropped from the prediction.
Depth averages the per-window predictions over the windows covering each pixel ("mean"),
segmentation sums the per-window softmax probabilities ("sum").

The reference runs one window per encoder call; here `window_batch` windows go through the
model together. Windows are accumulated in the same order either way, so the result is the same
up to what batch-size-dependent kernels change (last-ulp differences on some back-ends; exact
with per-sample-deterministic kernels, see tests/evaluation/test_inference.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

WINDOW = 256
STRIDE = 170  # int(256 * 2 / 3)
REDUCTIONS = ("mean", "sum")


def window_starts(size: int, window: int = WINDOW, stride: int = STRIDE) -> list[int]:
    """Start offsets 0, stride, 2 * stride, ... while < size (the last window may run past the
    border; `window` is unused by the rule and kept for symmetry with `sliding_window`)."""
    if size < 1 or stride < 1 or window < 1:
        raise ValueError(
            f"size, window and stride must be positive, got {size}, {window}, {stride}"
        )
    return list(range(0, size, stride))


def window_boxes(
    height: int, width: int, window: int = WINDOW, stride: int = STRIDE
) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of every window in row-major order, cut at the border."""
    return [
        (top, left, min(top + window, height), min(left + window, width))
        for top in window_starts(height, window, stride)
        for left in window_starts(width, window, stride)
    ]


def _cut_and_pad(image: torch.Tensor, box: tuple[int, int, int, int], window: int) -> torch.Tensor:
    """The (3, window, window) crop of `box`, zero-padded at the bottom and right."""
    top, left, bottom, right = box
    crop = image[:, top:bottom, left:right]
    return F.pad(crop, (0, window - (right - left), 0, window - (bottom - top)))


def sliding_window(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    window: int = WINDOW,
    stride: int = STRIDE,
    window_batch: int = 16,
    reduce: str = "mean",
) -> torch.Tensor:
    """Full-image prediction (C, H, W) of a normalised image (3, H, W).

    `predict` maps windows (N, 3, window, window) to (N, C, window, window) (sigmoid * max_depth
    or softmax applied by the caller). reduce "mean": sum / number of covering windows (depth);
    "sum": the plain sum (segmentation probabilities). Accumulates in float32."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if image.ndim != 3 or window_batch < 1:
        raise ValueError(f"expected image (3, H, W) and window_batch >= 1, got {tuple(image.shape)}, {window_batch}")  # fmt: skip
    height, width = image.shape[-2:]
    boxes = window_boxes(height, width, window, stride)
    total: torch.Tensor | None = None
    count = torch.zeros(1, height, width, device=image.device)
    for first in range(0, len(boxes), window_batch):
        chunk = boxes[first : first + window_batch]
        windows = torch.stack([_cut_and_pad(image, b, window) for b in chunk])  # (N, 3, win, win)
        out = predict(windows).float()  # (N, C, win, win)
        if total is None:
            total = torch.zeros(out.shape[1], height, width, device=image.device)
        for pred, (top, left, bottom, right) in zip(out, chunk, strict=True):
            total[:, top:bottom, left:right] += pred[:, : bottom - top, : right - left]
            count[:, top:bottom, left:right] += 1
    assert total is not None  # at least one window: window_starts is never empty
    return total / count if reduce == "mean" else total
