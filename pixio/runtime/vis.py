"""Pictures written by the trainer (each task draws its own; see `Task.pictures`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD


def to_pixels(
    imgs: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Normalised images (..., 3, H, W) -> pixel values clipped to [0, 1]."""
    m = torch.tensor(mean, dtype=imgs.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=imgs.dtype).view(-1, 1, 1)
    return (imgs * s + m).clamp(0.0, 1.0)


def tile(rows: list[list[torch.Tensor]], pad: int) -> np.ndarray:
    """Lay (3, H, W) [0, 1] panels out in a grid separated by `pad` white pixels -> uint8 HWC."""
    _, height, width = rows[0][0].shape
    n_rows, n_cols = len(rows), len(rows[0])
    grid = torch.ones(3, n_rows * (height + pad) - pad, n_cols * (width + pad) - pad)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            y, x = r * (height + pad), c * (width + pad)
            grid[:, y : y + height, x : x + width] = panel
    return (grid.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) uint8 array as PNG (parent folders created; temp file + rename so a
    reader never sees half a picture). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
