"""Distillation's models: the student (an encoder with `last_proj` to the teacher's width, on a
masked input) and the teacher's features (last block output, before the final norm)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixio.checkpoint import ArchitectureError, StateMismatchError, broadcast_encoder_state
from pixio.models.encoder import LayerNorm, PixioEncoder
from pixio.models.init import init_parameters
from pixio.models.masking import group_masking
from pixio.models.registry import encoder_kwargs
from pixio.runtime.config import ConfigError

PROJ_PREFIX = "last_proj."  # dropped by pixio.checkpoint.encoder_state: not part of the encoder


class Student(PixioEncoder):
    """A Pixio encoder whose final-normed tokens pass through `last_proj` = Linear(D_s, D_t) ->
    LayerNorm(D_t) -> GELU -> Linear(D_t, D_t). One module, so its state dict holds the encoder's
    reference keys plus `last_proj.*` (a checkpoint's student loads into `pixio.load_encoder`)."""

    def __init__(self, teacher_dim: int, mask_grid: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # the PixioEncoder arguments
        self.mask_grid = mask_grid
        self.teacher_dim = teacher_dim
        self.last_proj = nn.Sequential(
            nn.Linear(self.embed_dim, teacher_dim),
            LayerNorm(teacher_dim, eps=1e-5),  # nn.LayerNorm's default eps, computed in fp32
            nn.GELU(),
            nn.Linear(teacher_dim, teacher_dim),
        )
        # The encoder's parameters were initialised by PixioEncoder.__init__ (same base seed).
        init_parameters(self, self.init_seed, select=lambda n: n.startswith(PROJ_PREFIX))

    def forward(  # type: ignore[override]
        self, imgs: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected tokens (B, n_cls + n_vis, D_t) of the visible patch groups, and ids_keep
        (B, n_vis), the patch indices in token order (None when mask_ratio is 0: every patch,
        row-major). `noise` (B, num_groups) fixes the masking (tests)."""
        tokens, grid = self.embed_patches(imgs)  # tokens: (B, h*w, D_s), position added
        ids_keep = None
        if mask_ratio > 0:
            m = group_masking(tokens.shape[0], grid, self.mask_grid, mask_ratio, noise, imgs.device)
            ids_keep = m.ids_keep
            index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = torch.gather(tokens, 1, index)  # (B, n_vis, D_s)
        x = self.prepend_cls(tokens)
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.last_proj(self.norm(x)), ids_keep


def build_student(name: str, teacher_dim: int, mask_grid: int, **overrides: Any) -> Student:
    """Student `name` (registry size, `overrides` such as drop_path or a smaller depth)."""
    return Student(teacher_dim, mask_grid, **encoder_kwargs(name, **overrides))


def teacher_tokens(teacher: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """The teacher's last block output before the final norm, class tokens then patch tokens:
    (B, n_cls + h*w, D_t). `teacher` is the (possibly sharded) encoder; call under no_grad."""
    last = teacher(imgs, [-1])[0]
    return torch.cat([last["cls_tokens"], last["patch_tokens"]], dim=1)


def teacher_loader(path: str | Path) -> Callable[[nn.Module], None]:
    """`ModuleSpec.load` for the teacher: rank 0 reads `path` (any format `pixio.load_encoder`
    reads; a training checkpoint directory verified against its manifest, once, there) and
    checks it strictly, then the weights are broadcast into the placed (replicated or sharded)
    module (`pixio.checkpoint.broadcast_encoder_state`); a damaged, unreadable or mismatched
    checkpoint is a `teacher.checkpoint` config error on every rank, naming the differing sizes
    when the file records its architecture."""

    def load(module: nn.Module) -> None:
        try:
            broadcast_encoder_state(module, path)
        except (StateMismatchError, ArchitectureError) as err:
            raise ConfigError(
                f"teacher.checkpoint: {err} (check teacher.name, teacher.img_size and the size "
                "overrides)"
            ) from None
        except ValueError as err:  # damaged, unsafe or unreadable: the file, not the sizes
            raise ConfigError(f"teacher.checkpoint: {err}") from None

    return load
