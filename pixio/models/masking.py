"""4x4 patch-group masking: whole g x g groups of patches are kept or masked together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pixio.models.mask_counts import num_kept


@dataclass
class GroupMask:
    """Result of one masking draw for a batch.

    ids_keep: (B, n_visible) patch indices fed to the encoder, group by group in kept order.
    mask: (B, L) 0 visible, 1 masked, in original (row-major) patch order.
    ids_restore: (B, L) argsort of [kept ids..., masked ids...]; gathers the shuffled sequence back.
    """

    ids_keep: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def check_mask_ratio(mask_ratio: float) -> None:
    """ValueError unless 0 <= mask_ratio < 1."""
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def group_patch_ids(h: int, w: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """(num_groups, grid*grid) patch indices: groups row-major, patches row-major inside a group."""
    if grid < 1 or h % grid or w % grid:
        raise ValueError(
            f"mask_grid {grid} does not divide the {h}x{w} patch grid "
            f"(image sides must be multiples of patch_size * mask_grid)"
        )
    rows = torch.arange(h, device=device).view(h // grid, grid, 1, 1)
    cols = torch.arange(w, device=device).view(1, 1, w // grid, grid)
    ids = rows * w + cols  # (gh, g, gw, g)
    return ids.permute(0, 2, 1, 3).reshape(-1, grid * grid)


def num_groups(h: int, w: int, grid: int) -> int:
    """Number of g x g groups in an h x w patch grid."""
    return (h // grid) * (w // grid)


def group_masking(
    batch: int,
    grid_hw: tuple[int, int],
    mask_grid: int,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> GroupMask:
    """Draw (or take from `noise` (B, num_groups), lowest kept) the groups to keep per sample."""
    check_mask_ratio(mask_ratio)
    h, w = grid_hw
    groups = group_patch_ids(h, w, mask_grid, device)  # (G, g*g)
    n_groups = groups.shape[0]
    if noise is None:
        noise = torch.rand(batch, n_groups, device=device)
    elif tuple(noise.shape) != (batch, n_groups):
        raise ValueError(f"noise must have shape {(batch, n_groups)}, got {tuple(noise.shape)}")
    len_keep = num_kept(n_groups, mask_ratio)
    group_order = torch.argsort(noise.to(groups.device), dim=1)  # ascending: lowest noise kept
    ids_shuffle = groups[group_order].reshape(batch, -1)  # (B, L) kept patches first
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_keep = len_keep * mask_grid * mask_grid
    mask = torch.ones_like(ids_shuffle, dtype=torch.float32)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return GroupMask(ids_keep=ids_shuffle[:, :n_keep], mask=mask, ids_restore=ids_restore)
