"""Pictures of the depth and segmentation heads: the input, the prediction and the ground truth
side by side, as (H, 3W, 3) uint8 arrays (written under `output_dir/vis/` and logged to wandb)."""

from __future__ import annotations

import numpy as np
import torch

from pixio.runtime.vis import to_pixels

# Anchors of a perceptually ordered colour map (dark blue -> teal -> yellow), near to the viridis
# colours, so the pictures need no plotting library.
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
IGNORE_COLOUR = (0, 0, 0)  # invalid depth / ignored segmentation pixels


def unnormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image -> (H, W, 3) uint8."""
    rgb = to_pixels(image.detach().float().cpu())
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 on the colour map, `low` dark, `high` bright."""
    t = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(t.astype(np.int64), len(_ANCHORS) - 2)
    frac = (t - i)[..., None]
    return ((1 - frac) * _ANCHORS[i] + frac * _ANCHORS[i + 1]).round().astype(np.uint8)


def depth_picture(
    image: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, max_depth: float
) -> np.ndarray:
    """input | predicted depth | ground truth (black where invalid); near is bright. One colour
    scale for both maps: 0 to the largest ground-truth depth (max_depth when none)."""
    pred_np = pred.detach().float().cpu().reshape(pred.shape[-2:]).numpy()
    gt_np = target.detach().float().cpu().reshape(target.shape[-2:]).numpy()
    valid = gt_np > 0
    far = float(gt_np[valid].max()) if valid.any() else max_depth
    pred_rgb = colorize(far - pred_np, 0.0, far)
    gt_rgb = colorize(far - gt_np, 0.0, far)
    gt_rgb[~valid] = IGNORE_COLOUR
    return np.concatenate([unnormalize(image), pred_rgb, gt_rgb], axis=1)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, fixed for a class count (seeded)."""
    rng = np.random.default_rng(num_classes)
    return rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)


def segmentation_picture(
    image: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, num_classes: int
) -> np.ndarray:
    """input | prediction overlaid on the input | ground truth overlaid (ignored pixels black)."""
    rgb = unnormalize(image).astype(np.float64)
    colours = palette(num_classes)

    def overlay(labels: torch.Tensor) -> np.ndarray:
        ids = labels.detach().cpu().reshape(labels.shape[-2:]).numpy().astype(np.int64)
        known = (ids >= 0) & (ids < num_classes)
        mixed = 0.5 * rgb + 0.5 * colours[np.where(known, ids, 0)]
        mixed[~known] = IGNORE_COLOUR
        return mixed.round().astype(np.uint8)

    return np.concatenate([rgb.astype(np.uint8), overlay(pred), overlay(target)], axis=1)
