"""The feature API every frozen encoder offers the evaluation heads, k-NN and distillation.

`FeatureEncoder` holds the one implementation of it, over four things a subclass provides:
`tokens(x)` (class, register and patch tokens with positions, before the first block), `blocks`,
the final `norm` and the patch grid's stride `patch_size`. `PixioEncoder` and the baseline
adapters (`pixio.models.baselines`: transformers ViT / ViTMAE / DINOv2, timm ViTs and hybrids)
are such subclasses, so a head trained on one runs unchanged on the others.

Token layout of `tokens(x)`: (B, n_cls + n_reg + h*w, D), class tokens first, then register
tokens (which no feature exposes), then the patches in row-major order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FeatureEncoder(nn.Module):
    """Per-block class and patch tokens, before and after the final norm (see `features`)."""

    patch_size: int  # stride of the patch grid in pixels (a hybrid's: backbone stride x patch)
    embed_dim: int  # token width D
    n_cls_tokens: int  # class tokens (Pixio: 8; ViT, MAE, DINOv2: 1)
    n_register_tokens: int = 0  # register tokens after the class tokens (skipped)

    # ---- what a subclass provides ---------------------------------------------------------
    blocks: nn.ModuleList  # the transformer blocks, in order
    norm: nn.Module  # the final norm

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> (B, n_cls + n_reg + h*w, D), position embeddings added."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block on the token sequence (B, N, D) -> (B, N, D)."""
        return block(x)

    source: str = "pixio"  # where the model comes from (pixio.runtime.choices.ENCODER_SOURCES)

    # ---- the API ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What results.json records about the encoder's architecture."""
        return {
            "source": self.source,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "n_cls_tokens": self.n_cls_tokens,
            "n_register_tokens": self.n_register_tokens,
        }

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def patch_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid (h, w) of an image batch; ValueError unless H and W divide by the patch size."""
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"input size {height}x{width} is not divisible by the patch size {p}: "
                f"resize or crop to a multiple of {p} (e.g. {height // p * p}x{width // p * p})"
            )
        return height // p, width // p

    def select_blocks(self, block_ids: list[int] | None) -> list[int]:
        """Validate block indices (negative allowed, as in Python) and return them non-negative."""
        if block_ids is None:
            return list(range(self.depth))
        out = []
        for i in block_ids:
            if not -self.depth <= i < self.depth:
                raise ValueError(f"block id {i} out of range for an encoder of depth {self.depth}")
            out.append(i % self.depth)
        return out

    def forward(self, x: torch.Tensor, block_ids: list[int] | None = None) -> list[dict]:
        """Reference feature API (see `features`)."""
        return self.features(x, block_ids)

    def features(self, x: torch.Tensor, block_ids: list[int] | None = None) -> list[dict]:
        """Per selected block (all when None), in the order asked: `cls_tokens` (B, n_cls, D) and
        `patch_tokens` (B, h*w, D) as the block outputs them, and their `*_norm` versions (the
        final norm applied). Blocks after the last one asked for are not run."""
        wanted = self.select_blocks(block_ids)
        self.patch_grid(x)  # a clear error for a size the grid does not fit
        x = self.tokens(x)  # x: (B, n_cls + n_reg + h*w, D)
        n, first_patch = self.n_cls_tokens, self.n_cls_tokens + self.n_register_tokens
        feats = {}
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            x = self.run_block(blk, x)
            if i in wanted:
                xn = self.norm(x)
                feats[i] = {
                    "cls_tokens": x[:, :n],
                    "patch_tokens": x[:, first_patch:],
                    "cls_tokens_norm": xn[:, :n],
                    "patch_tokens_norm": xn[:, first_patch:],
                }
        return [feats[i] for i in wanted]

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Convenience for the common case (no grad): final normed tokens and the global embedding.

        Returns `cls_tokens` (B, n_cls, D), `patch_tokens` (B, h*w, D), `patch_map` (B, D, h, w) and
        `embedding` (B, D) = mean of the normed class tokens (the recommended global feature).
        """
        h, w = self.patch_grid(x)
        last = self.features(x, block_ids=[-1])[0]
        cls, patches = last["cls_tokens_norm"], last["patch_tokens_norm"]
        patch_map = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return {
            "cls_tokens": cls,
            "patch_tokens": patches,
            "patch_map": patch_map,
            "embedding": cls.mean(dim=1),
        }
