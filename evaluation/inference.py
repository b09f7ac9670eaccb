"""Sliding-window inference on full images (docs/reproduction.md, "Protocol details").

Window 256, stride int(256 * 2 / 3) = 170; rows and columns start at 0, 170, 340, ... while
< H (resp. W). A window running past the border is cut and zero-padded to 256 x 256 after
normalisation (the pad is the mean colour); its padded part is dropped from the prediction.
Depth averages the per-window predictions over the windows covering each pixel ("mean"),
segmentation sums the per-window softmax probabilities ("sum").

Test-time augmentation (`eval.tta`, off by default as in the reference): `flip` averages the
prediction of the image and that of its mirror image, flipped back; `multiscale` does the same at
every scale of `eval.tta_scales` (mmsegmentation's aug-test recipe: ratios 0.5-1.75, each with
and without a flip): the image is resized (bilinear), predicted with the same sliding windows,
and the prediction resized back (bilinear) before the average. Every pass contributes the
per-pixel mean over its windows (depth in metres, class probabilities), so a pass at another
scale weighs as much as the original.

The reference runs one window per encoder call; here `window_batch` windows go through the
model together. Windows are accumulated in the same order either way, so the result is the same
up to what batch-size-dependent kernels change (last-ulp differences on some back-ends; exact
with per-sample-deterministic kernels, see tests/evaluation/test_inference.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

from evaluation.choices import TTA_MODES, TTA_SCALES

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


def tta_passes(mode: str, scales: Sequence[float] = TTA_SCALES) -> list[tuple[float, bool]]:
    """(scale, flipped) of each prediction `predict_with_tta` averages: `none` one, `flip` the
    image and its mirror, `multiscale` every scale with and without the flip."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    if mode == "none":
        return [(1.0, False)]
    chosen = (1.0,) if mode == "flip" else tuple(scales)
    return [(float(scale), flip) for scale in chosen for flip in (False, True)]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The image's size at `scale`, rounded, at least one pixel."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, *size), bilinear with half-pixel centres (align_corners=False, as
    mmsegmentation's resizes); unchanged when the size is already that."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def predict_with_tta(
    run: Callable[[torch.Tensor, str], torch.Tensor],
    image: torch.Tensor,
    passes: Sequence[tuple[float, bool]],
    reduce: str = "mean",
) -> torch.Tensor:
    """Full-image prediction (C, H, W) of a normalised image (3, H, W) averaged over `passes`
    (`tta_passes`); `run(image, reduce)` predicts one image with sliding windows. A single pass
    at scale 1 without a flip is `run(image, reduce)` itself (the reference path); otherwise each
    pass is the windows' per-pixel mean ("mean") on the flipped / resized image, resized back to
    (H, W) and flipped back, and the passes are averaged."""
    if list(passes) == [(1.0, False)]:
        return run(image, reduce)
    height, width = image.shape[-2:]
    total: torch.Tensor | None = None
    for scale, flip in passes:
        x = image.flip(-1) if flip else image
        out = run(resize(x, scaled_size(height, width, scale)), "mean")  # (C, h, w)
        out = resize(out, (height, width))
        out = out.flip(-1) if flip else out
        total = out if total is None else total + out
    assert total is not None, "no TTA pass"
    return total / len(passes)
