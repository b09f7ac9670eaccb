"""Reconstruction grid: layout, exact visible patches, norm_pix_loss de-normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.patchify import patchify
from pixio.runtime.vis import save_png
from pretraining.vis import reconstruction_grid, reconstruction_picture, reconstruction_rows

P, H, W, PAD = 8, 16, 32, 2  # non-square: a 2 x 4 patch grid


def batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images and a mask with masked and visible patches in every image."""
    g = torch.Generator().manual_seed(seed)
    # Patch statistics far from (0, 1), so per-patch normalisation visibly matters.
    imgs = 0.8 + 0.4 * torch.randn(b, 3, H, W, generator=g)
    mask = torch.zeros(b, (H // P) * (W // P))
    mask[:, [1, 2, 5]] = 1.0
    return imgs, mask


def panel(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = row * (H + PAD), col * (W + PAD)
    return grid[y : y + H, x : x + W]


def patch_view(img: np.ndarray, index: int) -> np.ndarray:
    r, c = divmod(index, W // P)
    return img[r * P : (r + 1) * P, c * P : (c + 1) * P]


def normalised_target(imgs: torch.Tensor) -> torch.Tensor:
    t = patchify(imgs, P)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()


def test_grid_shape_and_max_images() -> None:
    imgs, mask = batch(b=5)
    pred = torch.randn(5, mask.shape[1], P * P * 3)
    grid = reconstruction_grid(imgs, pred, mask, P, max_images=4, pad=PAD)
    assert grid.dtype == np.uint8
    assert grid.shape == (4 * (H + PAD) - PAD, 3 * (W + PAD) - PAD, 3)


def test_visible_patches_exact_and_masked_grey() -> None:
    imgs, mask = batch()
    pred = torch.full((3, mask.shape[1], P * P * 3), 1e3)  # wildly wrong predictions
    pred[0, 0] = float("nan")  # even NaN in a visible slot must not leak in
    grid = reconstruction_grid(imgs, pred, mask, P, pad=PAD)
    for i in range(3):
        original, masked, recon = (panel(grid, i, c) for c in range(3))
        for k in range(mask.shape[1]):
            if mask[i, k]:
                assert (patch_view(masked, k) == 128).all()
                assert not np.array_equal(patch_view(recon, k), patch_view(original, k))
            else:
                assert np.array_equal(patch_view(recon, k), patch_view(original, k))
                assert np.array_equal(patch_view(masked, k), patch_view(original, k))


def test_original_panel_is_denormalised() -> None:
    imgs, mask = batch(b=1)
    grid = reconstruction_grid(imgs, torch.zeros(1, 8, P * P * 3), mask, P, pad=PAD)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = ((imgs[0] * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(panel(grid, 0, 0), expected.permute(1, 2, 0).numpy())


def test_norm_pix_prediction_denormalised_with_original_patch_stats() -> None:
    imgs, mask = batch()
    # A perfect prediction in per-patch normalised units reconstructs the original
    # (up to float rounding of one uint8 level).
    grid = reconstruction_grid(imgs, normalised_target(imgs), mask, P, norm_pix_loss=True, pad=PAD)
    for i in range(3):
        diff = panel(grid, i, 2).astype(int) - panel(grid, i, 0).astype(int)
        assert np.abs(diff).max() <= 1
    # Without de-normalisation the same prediction would be far off.
    raw = reconstruction_grid(imgs, normalised_target(imgs), mask, P, norm_pix_loss=False, pad=PAD)
    assert np.abs(panel(raw, 0, 2).astype(int) - panel(raw, 0, 0).astype(int)).max() > 20


def test_plain_pixel_prediction_exact() -> None:
    imgs, mask = batch()
    grid = reconstruction_grid(imgs, patchify(imgs, P), mask, P, norm_pix_loss=False, pad=PAD)
    for i in range(3):
        assert np.array_equal(panel(grid, i, 2), panel(grid, i, 0))


def test_save_png_round_trip(tmp_path: Path) -> None:
    imgs, mask = batch(b=2)
    grid = reconstruction_grid(imgs, torch.zeros(2, 8, P * P * 3), mask, P)
    path = save_png(grid, tmp_path / "vis" / "step10.png")
    assert path == tmp_path / "vis" / "step10.png"
    assert np.array_equal(np.asarray(Image.open(path)), grid)
    assert [p.name for p in (tmp_path / "vis").iterdir()] == ["step10.png"]


def test_titled_picture_draws_the_grid_rows() -> None:
    """The training picture renders the same rows as the grid (panels enlarged to about
    PANEL_PX), with column titles and the figure title drawn as text: a taller, wider RGB
    image whose title area is not blank, and a title change changes the picture."""
    imgs, mask = batch(b=2)
    pred = torch.randn(2, mask.shape[1], P * P * 3)
    rows = reconstruction_rows(imgs, pred, mask, P)
    assert len(rows) == 2 and all(len(r) == 3 for r in rows)
    grid = reconstruction_grid(imgs, pred, mask, P, pad=PAD)
    for i, row in enumerate(rows):  # the panels are the grid's, pixel for pixel
        for c, t in enumerate(row):
            assert np.array_equal(panel(grid, i, c), (t.permute(1, 2, 0) * 255).round().byte().numpy())  # fmt: skip
    a = reconstruction_picture(rows, 0.75, "MAE reconstructions (loss 0.500)")
    b = reconstruction_picture(rows, 0.75, "MAE reconstructions (loss 0.900)")
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert a.shape[0] > 2 * H * 4 and a.shape[1] > 3 * W * 4  # enlarged for reading
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert (a[:20] < 128).any()  # dark title text at the top
