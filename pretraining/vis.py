"""Pre-training's picture: original | masked input | reconstruction, one row per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.patchify import patchify, unpatchify
from pixio.runtime.vis import tile, to_pixels

MASK_GREY = 0.5  # pixel value (0-1) shown for masked patches in the masked-input panel


def denormalize_pred(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Undo norm_pix_loss: a prediction in per-patch normalised units, back to image units with
    the original patch's mean and unbiased variance (the same statistics as the loss)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return pred * (var + eps).sqrt() + mean


def _reconstruct(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix_loss: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction in normalised image units (B, 3, H, W), and the mask per pixel (1 = masked)."""
    h, w = imgs.shape[2] // p, imgs.shape[3] // p
    target = patchify(imgs, p)
    if norm_pix_loss:
        pred = denormalize_pred(pred, target)
    masked = mask.bool().unsqueeze(-1).expand_as(target)
    # torch.where, not a blend: visible patches stay bit-identical to the original even if the
    # prediction holds NaN/inf.
    recon = unpatchify(torch.where(masked, pred, target), p, h, w)
    pixel_mask = unpatchify(masked.to(imgs.dtype), p, h, w)
    return recon, pixel_mask


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
    n = min(max_images, imgs.shape[0])
    if n < 1:
        raise ValueError("reconstruction_grid needs at least one image")
    imgs, pred, mask = (t[:n].detach().float().cpu() for t in (imgs, pred, mask))
    recon, pixel_mask = _reconstruct(imgs, pred, mask, patch_size, norm_pix_loss)
    original, recon = to_pixels(imgs, mean, std), to_pixels(recon, mean, std)
    masked = torch.where(pixel_mask.bool(), torch.full_like(original, MASK_GREY), original)
    rows = [[original[i], masked[i], recon[i]] for i in range(n)]
    return tile(rows, pad)
