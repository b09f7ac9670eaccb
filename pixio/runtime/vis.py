"""Pictures: what the trainer's tasks (`Task.pictures`) and `pixio.visualize` share, from
de-normalisation, grid tiling and PNG writing to the PCA colouring of patch features, and
`render_panels`: a titled grid of panels with colour bars and legends (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.patchify import patchify, unpatchify


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


def pca_basis(features: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), components (D, k)) of `features` (N, D): the top-k principal directions."""
    mean = features.mean(0)
    _, _, v = torch.linalg.svd(features - mean, full_matrices=False)  # v: (min(N, D), D)
    comps = v[:k].T
    if comps.shape[1] < k:  # fewer samples than components: pad with zero directions
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], k - comps.shape[1])], 1)
    return mean, comps


def to_colors(projected: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(N, 3) projections -> [0, 1] colours, each channel scaled from [low, high]."""
    return ((projected - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class PCAColors:
    """Patch features shown as colours: their first three principal components (fitted on one
    set of features), each scaled by the range the fitting set spans. Features coloured with
    the same `PCAColors` are comparable: matching colours mean matching features."""

    mean: torch.Tensor  # (D,)
    comps: torch.Tensor  # (D, 3)
    low: torch.Tensor  # (3,) smallest projection of the fitting set, per component
    high: torch.Tensor  # (3,) largest

    @classmethod
    def fit(cls, features: torch.Tensor) -> PCAColors:
        """Fit on features (N, D) (float32 on the CPU)."""
        features = features.detach().float().cpu()
        mean, comps = pca_basis(features)
        projected = (features - mean) @ comps  # (N, 3)
        return cls(mean, comps, projected.min(0).values, projected.max(0).values)

    def colors(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch features (h*w, D), row-major -> a (3, h, w) [0, 1] colour map."""
        projected = (features.detach().float().cpu() - self.mean) @ self.comps  # (h*w, 3)
        return to_colors(projected, self.low, self.high).T.reshape(3, *grid)


def upsample_nearest(panel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, h, w) -> (C, H, W) by repeating each patch value over its pixels."""
    return torch.nn.functional.interpolate(panel[None], size=(height, width), mode="nearest")[0]


MASK_GREY = 0.5  # pixel value (0-1) shown for masked patches


def mae_reconstruction(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix_loss: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """An MAE's reconstruction in normalised image units (B, 3, H, W): masked patches from the
    prediction (B, L, p*p*3) (with `norm_pix_loss` brought back to image units with each
    original patch's mean and unbiased variance, the loss's statistics), visible patches from
    `imgs`; and the mask per pixel (B, 3, H, W), 1 = masked. mask (B, L), 1 = masked."""
    h, w = imgs.shape[2] // patch, imgs.shape[3] // patch
    target = patchify(imgs, patch)  # (B, L, p*p*3)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    masked = mask.bool().unsqueeze(-1).expand_as(target)
    # torch.where, not a blend: visible patches stay bit-identical even if pred holds NaN/inf
    recon = unpatchify(torch.where(masked, pred, target), patch, h, w)
    return recon, unpatchify(masked.to(imgs.dtype), patch, h, w)


# ---- titled pictures ---------------------------------------------------------------------------
PANEL_PX = 256  # default shorter side of a rendered panel, in pixels: a readable size
DPI = 100
BAD_COLOUR = "black"  # pixels of a map without a value (masked): invalid depth, ignored labels


@dataclass
class Panel:
    """One picture of a `render_panels` grid: an (H, W, 3) RGB image (uint8, or float in
    [0, 1]), or an (H, W) map drawn with `cmap` from `vmin` to `vmax` (a masked array's masked
    pixels in BAD_COLOUR) and, with `colorbar`, a colour bar labelled with it (units); a title;
    optional `legend` entries (name, RGB uint8 colour) listed beside it."""

    image: np.ndarray
    title: str
    vmin: float | None = None
    vmax: float | None = None
    cmap: str = "viridis"
    colorbar: str | None = None
    legend: Sequence[tuple[str, Sequence[int]]] = field(default_factory=tuple)


def render_panels(
    rows: Sequence[Sequence[Panel]], title: str = "", panel_px: int = PANEL_PX
) -> np.ndarray:
    """A grid of titled panels (one row per sequence) -> (H, W, 3) uint8. Each panel's shorter
    side is about `panel_px` pixels whatever its data's size (small crops are shown enlarged,
    nearest neighbour), colour bars and legends beside their panel, `title` above all. Drawn
    with matplotlib's Agg canvas (no display, no global pyplot state): about 0.1-0.3 s for a
    row of three panels on one CPU core."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    height, width = rows[0][0].image.shape[:2]
    scale = panel_px / min(height, width)
    extra = 1.35 if any(p.legend or p.colorbar for r in rows for p in r) else 1.0
    inches = (n_cols * width * scale * extra / DPI, n_rows * (height * scale + 40) / DPI + 0.5)
    fig = Figure(figsize=inches, dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            axes[r][c].set_axis_off()
            if c < len(rows[r]):
                _draw_panel(fig, axes[r][c], rows[r][c])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _draw_panel(fig: Any, ax: Any, panel: Panel) -> None:
    if panel.image.ndim == 2:
        import matplotlib

        cmap = matplotlib.colormaps[panel.cmap].with_extremes(bad=BAD_COLOUR)
        shown = ax.imshow(panel.image, cmap=cmap, vmin=panel.vmin, vmax=panel.vmax,
                          interpolation="nearest")  # fmt: skip
        if panel.colorbar is not None:
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            bar.set_label(panel.colorbar)
    else:
        image = panel.image if panel.image.dtype == np.uint8 else np.clip(panel.image, 0.0, 1.0)
        ax.imshow(image, interpolation="nearest")
    ax.set_title(panel.title, fontsize=9)
    if panel.legend:
        from matplotlib.patches import Patch

        handles = [Patch(color=np.asarray(rgb) / 255.0, label=name) for name, rgb in panel.legend]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                  frameon=False, borderaxespad=0.0)  # fmt: skip
