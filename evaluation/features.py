"""Frozen-encoder features for the evaluation heads, and the encoder built from the shared
`encoder` config group (the group and its checks: `evaluation.encoder_config`, which loads no
torch).

The encoder is a Pixio one (`encoder.source=pixio`, the registry) or a baseline behind the same
feature API (`transformers`: ViT, ViTMAE, DINOv2 folders; `timm`: ViTs and hybrids by name), see
`pixio.models.baselines`. Heads consume, per used block, concat(final-normed patch tokens, mean
of the final-normed class tokens broadcast to every patch) as a (B, 2D, h, w) map (the protocol;
patch tokens first).
The DPT head reads blocks depth // 4 * k - 1 for k = 1..4, the linear head the last block.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from evaluation.encoder_config import (  # noqa: F401  (EncoderConfig, pixio_build: re-exported)
    EncoderConfig,
    baseline_kwargs,
    encoder_overrides,
    has_checkpoint,
    pixio_build,
)
from pixio.checkpoint import broadcast_checked_state, broadcast_encoder_state, checkpoint_digest
from pixio.models.baselines import BaselineError, build_baseline
from pixio.models.features import FeatureEncoder
from pixio.models.registry import build_encoder
from pixio.runtime.config import ConfigError
from pixio.runtime.parallel import cast_blocks, frozen_block_dtype

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

    def __init__(self, encoder: FeatureEncoder, block_ids: list[int]) -> None:
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


# ---- building the encoder (its config group and checks: evaluation.encoder_config) --------
def build_meta_encoder(cfg: Any) -> FeatureEncoder:
    """The encoder of an `encoder` node on the meta device: its architecture, no weights, no
    memory (a transformers folder's config.json gives a baseline's)."""
    with torch.device("meta"):
        if cfg.get("source", "pixio") == "pixio":
            name, overrides = pixio_build(cfg)
            return build_encoder(name, **overrides)
        folder = cfg.checkpoint if has_checkpoint(cfg) else None
        return build_baseline(cfg.source, cfg.name, folder, **baseline_kwargs(cfg))


def encoder_digest(cfg: Any) -> str | None:
    """The checkpoint's sha256 (`pixio.checkpoint.checkpoint_digest`) for the run's record and
    its resume check; None for a demo's random weights. Reads the whole file (a 5B checkpoint's
    22 GB: about 45 s at 500 MB/s; a training checkpoint directory: the per-file digests its
    manifest lists, a few kilobytes): call it once per job, on rank 0
    (`pixio.runtime.rank0.rank0_result`)."""
    if has_checkpoint(cfg):
        return checkpoint_digest(cfg.checkpoint)
    if not cfg.get("random_if_missing", False):
        raise ConfigError(f"encoder.checkpoint: not found: {cfg.checkpoint}")
    return None


def load_frozen_encoder(
    cfg: Any, device: torch.device | None = None, precision: str = "fp32"
) -> FeatureEncoder:
    """The encoder of an `encoder` config node on `device` (default CPU), in eval mode with
    gradients off; random weights (with a warning) only when `random_if_missing` and the
    checkpoint is absent. Built on the meta device and filled by rank 0's read of the
    checkpoint, broadcast to the others: one read and one host copy per job, not per rank.
    `precision` (the run's `train.precision`): bf16 on a GPU gives bf16 blocks (the trainer's
    frozen policy, `pixio.runtime.parallel.frozen_block_dtype`), cast before the encoder
    reaches the GPU: a 5B encoder never holds its 21.8 GB of fp32 weights there."""
    device = device or torch.device("cpu")
    dtype = frozen_block_dtype(device, precision)
    if not has_checkpoint(cfg):
        if not cfg.get("random_if_missing", False):
            raise ConfigError(f"encoder.checkpoint: not found: {cfg.checkpoint}")
        log.warning(
            "encoder checkpoint %s not found: using RANDOMLY INITIALISED %s weights (demo only)",
            cfg.checkpoint,
            cfg.name,
        )
        encoder = _random_encoder(cfg)
        cast_blocks(encoder.blocks, dtype)  # on the CPU
        encoder = encoder.to(device)
    else:
        encoder = build_meta_encoder(cfg)  # no initialisation: the checkpoint fills every value
        cast_blocks(encoder.blocks, dtype)  # on the meta device: allocated in bf16 below
        encoder.to_empty(device=device)
        try:
            _fill(encoder, cfg)
        except ValueError as err:  # wrong name / sizes for this file: one line
            key = err.key if isinstance(err, BaselineError) else "checkpoint"
            raise ConfigError(f"encoder.{key}: {err}") from None
    encoder.requires_grad_(False)
    return encoder.eval()


def _random_encoder(cfg: Any) -> FeatureEncoder:
    if cfg.get("source", "pixio") == "pixio":
        return build_encoder(cfg.name, **encoder_overrides(cfg))
    return build_baseline(cfg.source, cfg.name, None, **baseline_kwargs(cfg))


def _fill(encoder: FeatureEncoder, cfg: Any) -> None:
    """Rank 0 reads the checkpoint (checked strictly) and broadcasts it."""
    if cfg.get("source", "pixio") == "pixio":
        broadcast_encoder_state(encoder, cfg.checkpoint, cfg.get("module"))
    else:

        def read() -> dict[str, torch.Tensor]:
            return encoder.read_state(cfg.checkpoint)

        broadcast_checked_state(encoder.model, read, str(cfg.checkpoint))
