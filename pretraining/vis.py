"""Pre-training's picture: original | masked input | reconstruction, one row per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.runtime.vis import MASK_GREY, Panel, mae_reconstruction, render_panels, tile, to_pixels


def reconstruction_grid(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    norm_pix_loss: bool = True,
    max_images: int = 8,
    pad: int = 2,
) -> np.ndarray:
    """(rows * H + gaps, 3 * W + gaps, 3) uint8 picture; per image a row of original | masked
    input (masked patches grey) | reconstruction (visible patches from the original, masked
    ones from the prediction). imgs (B, 3, H, W) normalised, pred (B, L, p*p*3), mask (B, L)
    with 1 = masked. `pad` white pixels separate the panels."""
    return tile(
        reconstruction_rows(imgs, pred, mask, patch_size, mean, std, norm_pix_loss, max_images), pad
    )


def reconstruction_rows(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    norm_pix_loss: bool = True,
    max_images: int = 8,
) -> list[list[torch.Tensor]]:
    """Per image (up to `max_images`): [original, masked input, reconstruction], each (3, H, W)
    in [0, 1] (arguments as `reconstruction_grid`'s)."""
    n = min(max_images, imgs.shape[0])
    if n < 1:
        raise ValueError("reconstruction_grid needs at least one image")
    imgs, pred, mask = (t[:n].detach().float().cpu() for t in (imgs, pred, mask))
    recon, pixel_mask = mae_reconstruction(imgs, pred, mask, patch_size, norm_pix_loss)
    original, recon = to_pixels(imgs, mean, std), to_pixels(recon, mean, std)
    masked = torch.where(pixel_mask.bool(), torch.full_like(original, MASK_GREY), original)
    return [[original[i], masked[i], recon[i]] for i in range(n)]


def reconstruction_picture(
    rows: list[list[torch.Tensor]], mask_ratio: float, title: str
) -> np.ndarray:
    """`reconstruction_rows` drawn as titled panels (input | masked (ratio) | reconstruction)
    under `title` -> (H, W, 3) uint8."""
    names = ("input", f"masked ({mask_ratio:.0%})", "reconstruction")
    panels = [
        [Panel(t.permute(1, 2, 0).numpy(), name) for t, name in zip(row, names, strict=True)]
        for row in rows
    ]
    return render_panels(panels, title)
