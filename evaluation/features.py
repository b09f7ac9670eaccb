"""Frozen-encoder features for the evaluation heads and the shared `encoder` config group.

Heads consume, per used block, concat(final-normed patch tokens, mean of the final-normed class
tokens broadcast to every patch) as a (B, 2D, h, w) map (SPEC section 7; patch tokens first).
The DPT head reads blocks depth // 4 * k - 1 for k = 1..4, the linear head the last block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixio.checkpoint import broadcast_encoder_state
from pixio.models.encoder import PixioEncoder
from pixio.models.registry import build_encoder, list_models
from pixio.runtime.config import ConfigError, require, require_set

log = logging.getLogger("pixio.eval")


def dpt_block_ids(depth: int) -> list[int]:
    """Blocks the DPT head reads: depth // 4 * k - 1, k = 1..4 (ViT-H: 7, 15, 23, 31)."""
    if depth < 4:
        raise ValueError(f"the DPT head needs an encoder of depth >= 4, got {depth}")
    return [depth // 4 * k - 1 for k in range(1, 5)]


def linear_block_ids(depth: int) -> list[int]:
    """Blocks the linear head reads: the last one."""
    return [depth - 1]


class FrozenFeatures(nn.Module):
    """A frozen encoder (eval mode, no gradients) giving one (B, 2D, h, w) map per block id.

    The encoder stops after the highest requested block. `train()` never switches the encoder
    out of eval mode, so a task can call `model.train()` on a wrapper safely.
    """

    def __init__(self, encoder: PixioEncoder, block_ids: list[int]) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.block_ids = list(block_ids)
        encoder.select_blocks(self.block_ids)  # range check now, not at the first batch

    def train(self, mode: bool = True) -> FrozenFeatures:
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W), H and W multiples of the patch size -> [(B, 2D, h, w)] per block."""
        h, w = self.encoder.patch_grid(images)
        return [token_map(f, h, w) for f in self.encoder.features(images, self.block_ids)]


def token_map(block: dict[str, torch.Tensor], h: int, w: int) -> torch.Tensor:
    """One block's feature dict -> concat(patch_tokens_norm, mean cls_tokens_norm): (B, 2D, h, w)."""
    patches = block["patch_tokens_norm"]  # (B, h*w, D)
    cls = block["cls_tokens_norm"].mean(dim=1, keepdim=True)  # (B, 1, D)
    x = torch.cat([patches, cls.expand_as(patches)], dim=2)  # (B, h*w, 2D)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


# ---- the `encoder` config group ----------------------------------------------------------------
@dataclass
class EncoderConfig:
    name: str = "pixio_vith16"  # registry name (pixio.list_models())
    checkpoint: str | None = (
        None  # anything pixio.load_encoder reads (.pth, .safetensors, DCP dir, HF folder)
    )
    module: str | None = (
        None  # trained module of a multi-module training checkpoint (None: the only one)
    )
    img_size: int | None = None  # position-table size the checkpoint was trained at (None: 256)
    embed_dim: int | None = None  # override the registry width (small demo/test encoders)
    depth: int | None = None  # override the registry depth
    num_heads: int | None = None  # override the registry head count
    n_cls_tokens: int | None = None  # override the class-token count (None: 8)
    random_if_missing: bool = False  # demo only: a missing checkpoint gives random weights (logged)


def encoder_overrides(cfg: Any) -> dict[str, Any]:
    """The registry overrides that are set in an `encoder` config node."""
    keys = ("img_size", "embed_dim", "depth", "num_heads", "n_cls_tokens")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def check_encoder(cfg: Any) -> None:
    """The `encoder` group: a known name and an existing checkpoint (ConfigError otherwise)."""
    require_set(cfg, "encoder.name")
    e = cfg.encoder
    require(e.name in list_models(), "encoder.name", f"unknown model {e.name!r}; known: {', '.join(list_models())}")  # fmt: skip
    if e.random_if_missing and (e.checkpoint is None or not Path(e.checkpoint).exists()):
        return
    require(e.checkpoint is not None, "encoder.checkpoint", "is required (a frozen evaluation of random weights says nothing)")  # fmt: skip
    require(Path(e.checkpoint).exists(), "encoder.checkpoint", f"not found: {e.checkpoint}")


def load_frozen_encoder(cfg: Any, device: torch.device | None = None) -> PixioEncoder:
    """The encoder of an `encoder` config node on `device` (default CPU), in eval mode with
    gradients off; random weights (with a warning) only when `random_if_missing` and the
    checkpoint is absent. Built on the meta device and filled by rank 0's read of the
    checkpoint, broadcast to the others: one read and one host copy per job, not per rank."""
    device = device or torch.device("cpu")
    overrides = encoder_overrides(cfg)
    if cfg.checkpoint is None or not Path(cfg.checkpoint).exists():
        if not cfg.get("random_if_missing", False):
            raise ConfigError(f"encoder.checkpoint: not found: {cfg.checkpoint}")
        log.warning(
            "encoder checkpoint %s not found: using RANDOMLY INITIALISED %s weights (demo only)",
            cfg.checkpoint,
            cfg.name,
        )
        encoder = build_encoder(cfg.name, **overrides).to(device)
    else:
        with torch.device("meta"):  # no initialisation: the checkpoint fills every value
            encoder = build_encoder(cfg.name, **overrides)
        encoder.to_empty(device=device)
        try:
            broadcast_encoder_state(encoder, cfg.checkpoint, cfg.get("module"))
        except ValueError as err:  # wrong name / sizes for this file: one line
            raise ConfigError(f"encoder.checkpoint: {err}") from None
    encoder.requires_grad_(False)
    return encoder.eval()
