"""Distillation's picture: per image, the input | the teacher's patch features | the student's,
the features shown as their first three principal components (fitted on the teacher's)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.runtime.vis import PCAColors, tile, to_pixels, upsample_nearest


def pca_panels(
    teacher: torch.Tensor, student: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student patch features (L, D) of one image -> two (3, h, w) colour maps in
    the same basis (the teacher's), so matching colours mean matching features. Tokens are
    L2-normalised first: a cosine loss aligns directions, not lengths."""
    teacher = torch.nn.functional.normalize(teacher.float(), dim=-1)
    student = torch.nn.functional.normalize(student.float(), dim=-1)
    pca = PCAColors.fit(teacher)
    return pca.colors(teacher, grid), pca.colors(student, grid)


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
        big = [upsample_nearest(p, height, width) for p in panels]  # patch colours
        rows.append([to_pixels(imgs[i], mean, std), *big])
    return tile(rows, pad)
