"""Image <-> patch-sequence conversions shared by the MAE loss, visualisation and heads."""

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C); per-patch pixel order is (row p, column q, channel c)."""
    b, c, height, width = imgs.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {p}")
    h, w = height // p, width // p
    x = imgs.reshape(b, c, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); inverse of `patchify`."""
    b, length, dim = x.shape
    p = patch_size
    if length != h * w or dim % (p * p):
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} into a {h}x{w} grid of {p}px patches")
    c = dim // (p * p)
    x = x.reshape(b, h, w, p, p, c)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, c, h * p, w * p)
