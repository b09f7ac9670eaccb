"""Distillation's picture: per image, the input | the teacher's patch features | the student's,
the features shown as their first three principal components (fitted on the teacher's), as a
titled grid of panels (`pixio.runtime.vis.render_panels`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.runtime.vis import Panel, PCAColors, render_panels, to_pixels, upsample_nearest


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


def _hwc(panel: torch.Tensor) -> np.ndarray:
    """(3, H, W) [0, 1] -> (H, W, 3) float32 array."""
    return panel.permute(1, 2, 0).numpy()


def pca_rows(
    imgs: torch.Tensor,
    teacher: torch.Tensor,
    student: torch.Tensor,
    grid: tuple[int, int],
    student_name: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> list[list[Panel]]:
    """Per image, three (H, W, 3) [0, 1] panels: the input, the teacher's patch features and
    the student's, both in the teacher's PCA basis (each patch one colour over its pixels).
    imgs (B, 3, H, W) normalised; teacher, student (B, L, D) patch features, L = h * w."""
    imgs = imgs.detach().float().cpu()
    height, width = imgs.shape[-2:]
    rows = []
    for i in range(imgs.shape[0]):
        maps = pca_panels(teacher[i].detach().cpu(), student[i].detach().cpu(), grid)
        ours, theirs = (_hwc(upsample_nearest(m, height, width)) for m in maps)
        rows.append([
            Panel(_hwc(to_pixels(imgs[i], mean, std)), "input"),
            Panel(ours, "teacher features (PCA)"),
            Panel(theirs, f"{student_name} features (teacher's basis)"),
        ])  # fmt: skip
    return rows


def pca_grid(
    imgs: torch.Tensor,
    teacher: torch.Tensor,
    student: torch.Tensor,
    grid: tuple[int, int],
    student_name: str,
    title: str = "",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """The titled picture of `pca_rows` -> (H, W, 3) uint8, each panel about
    `pixio.runtime.vis.PANEL_PX` pixels high whatever the crop size."""
    return render_panels(pca_rows(imgs, teacher, student, grid, student_name, mean, std), title)
