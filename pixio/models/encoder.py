"""The Pixio ViT encoder: patch embedding, learned position table, 8 class tokens, pre-norm blocks.

Built from timm layers so the state-dict keys are exactly the reference ones
(`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}.*`, `norm.*`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from pixio.constants import DEFAULT_N_CLS_TOKENS
from pixio.models.features import FeatureEncoder
from pixio.models.init import draw_init_seed, init_parameters


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-6) computed in the input's dtype, whatever its parameters' dtype.

    Under FSDP a block's parameters are gathered in bf16 while the residual stream stays fp32
    (pixio.runtime.parallel); this keeps the normalisation in fp32 there, as under DDP.
    """

    def __init__(self, dim: int, eps: float = 1e-6, **factory: Any) -> None:
        super().__init__(dim, eps=eps, **factory)  # factory: device / dtype, as timm passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class DropPath(nn.Module):
    """Stochastic depth of one residual branch: in training, each sample's branch is dropped
    with probability `drop_prob` and kept ones are scaled by 1 / keep (timm's rule).

    The keep probability is a 0-d CPU tensor attribute, not a Python float: torch.compile
    specialises on a module's float attributes, so blocks with different rates (linear over
    depth) would each compile their own graph; a tensor is a graph input instead, so every
    block of a stack shares one graph. A plain attribute, not a buffer: it stays out of the
    state dict, off the meta device and on the CPU, where it enters device kernels as a scalar.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)  # for display only: forward reads `keep`
        self.keep = torch.tensor(1.0 - self.drop_prob, dtype=torch.float32, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        kept = torch.rand(shape, dtype=torch.float32, device=x.device) < self.keep
        return x * (kept / self.keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def make_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float
) -> nn.ModuleList:
    """Pre-norm ViT blocks (exact GELU, qkv bias, no LayerScale); drop path linear over depth.

    With `drop_path` > 0 every block gets `DropPath` modules (the first one at rate 0), so all
    blocks run the same code and compile to one graph; with 0 they are identities."""
    # Plain Python (not torch.linspace) so models can be built on the meta device.
    rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    blocks = nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in rates
    )
    if drop_path > 0:
        for block, rate in zip(blocks, rates, strict=True):
            block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
    return blocks


def resize_pos_embed(
    table: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int], n_prefix: int
) -> torch.Tensor:
    """Bicubic (align_corners=False, no antialias) resize of the grid rows; prefix rows unchanged.

    table: (1, n_prefix + gh*gw, D) -> (1, n_prefix + h*w, D). Identity when the grid already fits.
    """
    if tuple(new_grid) == tuple(grid):
        return table
    return resample_abs_pos_embed(
        table, list(new_grid), list(grid), num_prefix_tokens=n_prefix, antialias=False
    )


class PixioEncoder(FeatureEncoder):
    """ViT encoder with `n_cls_tokens` class tokens and a resizable learned position table.

    `forward(x, block_ids)` is the reference feature API (`pixio.models.features.FeatureEncoder`):
    one dict per selected block with `cls_tokens` (B, n_cls, D), `patch_tokens` (B, h*w, D) (block
    output, before the final norm) and their `*_norm` versions (final `norm` applied).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 256,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1280,
        depth: int = 32,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        n_cls_tokens: int = DEFAULT_N_CLS_TOKENS,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        # Per-parameter seeds (pixio.models.init): the same weights whether built here or on the
        # meta device and materialised shard by shard under FSDP. Drawn first, because building
        # layers on the CPU consumes the global generator (their default init) and on meta not.
        self.init_seed = draw_init_seed()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.n_cls_tokens = n_cls_tokens
        # strict_img_size=False: any H, W divisible by the patch size is accepted (checked below).
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, strict_img_size=False
        )
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, n_cls_tokens, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_cls_tokens + num_patches, embed_dim))
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = LayerNorm(embed_dim)
        self.grad_checkpointing = False
        init_parameters(self, self.init_seed)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (trades compute for memory)."""
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Apply one block, with activation checkpointing when enabled and training."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table for a (h, w) patch grid: (1, n_cls + h*w, D)."""
        return resize_pos_embed(self.pos_embed, self.grid_size, grid, self.n_cls_tokens)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, C, H, W) -> patch tokens with position (B, h*w, D) and the grid (h, w)."""
        grid = self.patch_grid(x)
        pos = self.pos_embed_for(grid)
        tokens = self.patch_embed(x) + pos[:, self.n_cls_tokens :]
        return tokens, grid

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, n_cls + N, D): class tokens (with their position rows) in front."""
        cls = self.cls_token + self.pos_embed[:, : self.n_cls_tokens]
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> (B, n_cls + h*w, D): class tokens, then patches, with positions."""
        return self.prepend_cls(self.embed_patches(x)[0])
