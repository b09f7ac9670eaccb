"""Pictures of the depth and segmentation heads: input | prediction | ground truth, titled, as
(H, W, 3) uint8 arrays (written under `output_dir/vis/` and logged to wandb).

Depth maps share one colour scale with a colour bar in metres; segmentation maps carry a legend
of the classes shown (names and colours). The caller's title says which image, the training
step and the image's metric. Rendering: `pixio.runtime.vis.render_panels` (matplotlib, Agg).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixio.runtime.vis import Panel, render_panels, to_pixels

IGNORE_COLOUR = (0, 0, 0)  # ignored segmentation pixels (invalid depth: the maps' bad colour)
LEGEND_CLASSES = 12  # the most frequent classes of a picture named in its legend


def unnormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image -> (H, W, 3) uint8."""
    rgb = to_pixels(image.detach().float().cpu())
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _plane(values: torch.Tensor) -> np.ndarray:
    """(H, W), (1, H, W) or (C=1, H, W) tensor -> (H, W) float64 array."""
    return values.detach().float().cpu().reshape(values.shape[-2:]).numpy().astype(np.float64)


def depth_picture(
    image: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, max_depth: float, title: str
) -> np.ndarray:
    """input | predicted depth | ground truth (black where invalid), one colour scale from 0 to
    the largest ground-truth depth (max_depth when none), with a colour bar in metres."""
    pred_m, gt_m = _plane(pred), _plane(target)
    valid = gt_m > 0
    far = float(gt_m[valid].max()) if valid.any() else max_depth
    scale = dict(vmin=0.0, vmax=far, colorbar="depth (m)", cmap="viridis_r")  # near = bright
    rows = [[
        Panel(unnormalize(image), "input"),
        Panel(pred_m, "prediction", **scale),
        Panel(np.ma.masked_array(gt_m, ~valid), "ground truth (black: no depth)", **scale),
    ]]  # fmt: skip
    return render_panels(rows, title)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, fixed for a class count (seeded)."""
    rng = np.random.default_rng(num_classes)
    return rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)


def class_legend(
    labels: Sequence[np.ndarray], colours: np.ndarray, names: Sequence[str] | None
) -> list[tuple[str, np.ndarray]]:
    """(name, colour) of the classes in `labels` (id maps; ids outside the palette ignored),
    most frequent first, at most LEGEND_CLASSES of them."""
    ids = np.concatenate([m[(m >= 0) & (m < len(colours))].ravel() for m in labels])
    counts = np.bincount(ids, minlength=len(colours))
    shown = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k]][:LEGEND_CLASSES]
    return [(names[k] if names else f"class {k}", colours[k]) for k in shown]


def class_colours(ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ids outside the palette (255: ignored) black."""
    known = (ids >= 0) & (ids < len(colours))
    out = colours[np.where(known, ids, 0)]
    out[~known] = IGNORE_COLOUR
    return out


def segmentation_picture(
    image: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    title: str,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """input | predicted classes | ground truth classes (ignored pixels black), one colour per
    class, the legend naming the classes shown."""
    colours = palette(num_classes)
    pred_ids, gt_ids = (_plane(t).astype(np.int64) for t in (pred, target))
    legend = class_legend([pred_ids, gt_ids], colours, class_names)
    rows = [[
        Panel(unnormalize(image), "input"),
        Panel(class_colours(pred_ids, colours), "prediction"),
        Panel(class_colours(gt_ids, colours), "ground truth (black: ignored)", legend=legend),
    ]]  # fmt: skip
    return render_panels(rows, title)
