"""Distillation's picture: per image, the input | the teacher's patch features | the student's,
the features shown as their first three principal components (fitted on the teacher's)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.runtime.vis import tile, to_pixels


def pca_basis(features: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), components (D, k)) of `features` (N, D): the top-k principal directions."""
    mean = features.mean(0)
    _, _, v = torch.linalg.svd(features - mean, full_matrices=False)  # v: (min(N, D), D)
    comps = v[:k].T
    if comps.shape[1] < k:  # fewer samples than components: pad with zero directions
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], k - comps.shape[1])], 1)
    return mean, comps


def to_colors(projected: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(N, 3) projections -> [0, 1] colours, each channel scaled by the teacher's range."""
    return ((projected - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)


def pca_panels(
    teacher: torch.Tensor, student: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student patch features (L, D) of one image -> two (3, h, w) colour maps in
    the same basis (the teacher's), so matching colours mean matching features. Tokens are
    L2-normalised first: a cosine loss aligns directions, not lengths."""
    teacher = torch.nn.functional.normalize(teacher.float(), dim=-1)
    student = torch.nn.functional.normalize(student.float(), dim=-1)
    mean, comps = pca_basis(teacher)
    t, s = (teacher - mean) @ comps, (student - mean) @ comps  # (L, 3)
    low, high = t.min(0).values, t.max(0).values
    h, w = grid
    return tuple(to_colors(x, low, high).T.reshape(3, h, w) for x in (t, s))  # type: ignore[return-value]


def pca_grid(
    imgs: torch.Tensor,
    teacher: torch.Tensor,
    student: torch.Tensor,
    grid: tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pad: int = 2,
) -> np.ndarray:
    """(rows * H + gaps, 3 * W + gaps, 3) uint8: per image, the input | teacher PCA | student
    PCA. imgs (B, 3, H, W) normalised; teacher, student (B, L, D) patch features, L = h * w."""
    imgs = imgs.detach().float().cpu()
    height, width = imgs.shape[-2:]
    rows = []
    for i in range(imgs.shape[0]):
        panels = pca_panels(teacher[i].detach().cpu(), student[i].detach().cpu(), grid)
        big = [_upsample(p, height, width) for p in panels]  # patch colours, nearest
        rows.append([to_pixels(imgs[i], mean, std), *big])
    return tile(rows, pad)


def _upsample(panel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, h, w) -> (3, H, W) by repeating each patch colour over its pixels."""
    return torch.nn.functional.interpolate(panel[None], size=(height, width), mode="nearest")[0]
