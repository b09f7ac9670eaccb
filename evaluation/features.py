"""Frozen-encoder features for the evaluation heads and the shared `encoder` config group.

The encoder is a Pixio one (`encoder.source=pixio`, the registry) or a baseline behind the same
feature API (`transformers`: ViT, ViTMAE, DINOv2 folders; `timm`: ViTs and hybrids by name), see
`pixio.models.baselines`. Heads consume, per used block, concat(final-normed patch tokens, mean
of the final-normed class tokens broadcast to every patch) as a (B, 2D, h, w) map (the protocol;
patch tokens first).
The DPT head reads blocks depth // 4 * k - 1 for k = 1..4, the linear head the last block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixio.architecture import ArchitectureError, resolve
from pixio.checkpoint import (
    broadcast_checked_state,
    broadcast_encoder_state,
    checkpoint_digest,
    read_architecture,
)
from pixio.models.baselines import SOURCES, BaselineError, build_baseline
from pixio.models.features import FeatureEncoder
from pixio.models.registry import build_encoder, encoder_kwargs, list_models
from pixio.runtime.config import ConfigError, check_choice, require, require_set
from pixio.runtime.parallel import cast_blocks, frozen_block_dtype

log = logging.getLogger("pixio.eval")


REFERENCE_SIDE = 256  # the protocol's crop and window side for patch 16 (docs/reproduction.md)


def reference_side(patch: int) -> int:
    """The crop / window side for an encoder of this patch size: 256, or the largest multiple of
    the patch up to 256 (patch 14: 252), so the image tiles into whole patches."""
    return REFERENCE_SIDE // patch * patch


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


# ---- the `encoder` config group ----------------------------------------------------------------
@dataclass
class EncoderConfig:
    source: str = "pixio"  # pixio | transformers | timm (baselines: docs/evaluation.md, Baselines)
    # pixio: registry name; transformers: vit | vit_mae | dinov2 | dinov2_with_registers (the
    # folder's model_type); timm: a ViT's model name (hybrids included)
    name: str = "pixio_vith16"
    # pixio: .pth / .safetensors / training checkpoint dir / HF folder; transformers: a
    # from_pretrained folder; timm: a weights file, or a folder holding one
    checkpoint: str | None = None
    module: str | None = None  # pixio: trained module of a multi-module training checkpoint
    # pixio: sizes for a checkpoint that does not record its architecture (every .safetensors
    # file Pixio writes and a training checkpoint directory do: set, they must agree with it)
    img_size: int | None = None  # pixio, timm: position-table size the checkpoint was trained at
    embed_dim: int | None = None  # pixio: override the registry width (small demo/test encoders)
    depth: int | None = None  # pixio: override the registry depth
    num_heads: int | None = None  # pixio: override the registry head count
    n_cls_tokens: int | None = None  # pixio: override the class-token count (None: 8)
    # baselines: transformers config fields / timm.create_model arguments (e.g. tiny test sizes)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    random_if_missing: bool = False  # demo only: a missing checkpoint gives random weights (logged)


PIXIO_ONLY = ("module", "embed_dim", "depth", "num_heads", "n_cls_tokens")


def encoder_overrides(cfg: Any) -> dict[str, Any]:
    """The registry overrides that are set in an `encoder` config node."""
    keys = ("img_size", "embed_dim", "depth", "num_heads", "n_cls_tokens")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def baseline_kwargs(cfg: Any) -> dict[str, Any]:
    """What a baseline is built with: `model_kwargs`, and timm's `img_size` when set."""
    kwargs = dict(cfg.get("model_kwargs") or {})
    if cfg.get("img_size") is not None:
        kwargs["img_size"] = cfg.img_size
    return kwargs


def _has_checkpoint(cfg: Any) -> bool:
    return cfg.checkpoint is not None and Path(cfg.checkpoint).exists()


def pixio_build(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(registry name, build overrides) of a Pixio `encoder` node: the architecture its
    checkpoint records (every `.safetensors` file Pixio writes), checked against `name` and the
    size keys that are set (ConfigError naming the differing sizes); else `name` and those keys
    (a training checkpoint directory's tensors name any differing size when they are read)."""
    overrides = encoder_overrides(cfg)
    if not _has_checkpoint(cfg):
        return cfg.name, overrides
    try:
        arch = read_architecture(cfg.checkpoint, cfg.get("module"), run_config=False)
        return resolve(arch, cfg.name, overrides, cfg.checkpoint)
    except (ArchitectureError, ValueError) as err:  # a record that disagrees; an unreadable file
        raise ConfigError(f"encoder.checkpoint: {err}") from None


def build_meta_encoder(cfg: Any) -> FeatureEncoder:
    """The encoder of an `encoder` node on the meta device: its architecture, no weights, no
    memory (a transformers folder's config.json gives a baseline's)."""
    with torch.device("meta"):
        if cfg.get("source", "pixio") == "pixio":
            name, overrides = pixio_build(cfg)
            return build_encoder(name, **overrides)
        folder = cfg.checkpoint if _has_checkpoint(cfg) else None
        return build_baseline(cfg.source, cfg.name, folder, **baseline_kwargs(cfg))


def encoder_patch_size(cfg: Any) -> int:
    """The patch grid's stride of an `encoder` node's model (a hybrid's: stem stride x patch)."""
    if cfg.get("source", "pixio") == "pixio":
        name, overrides = pixio_build(cfg)
        return encoder_kwargs(name, **overrides)["patch_size"]
    return build_meta_encoder(cfg).patch_size


def check_encoder(cfg: Any) -> int:
    """The `encoder` group: a known source and model, an existing checkpoint that the model's
    family accepts (ConfigError naming the key otherwise). Returns the model's patch size."""
    require_set(cfg, "encoder.name")
    e = cfg.encoder
    check_choice(e, "encoder", "source", SOURCES)
    if e.source == "pixio":
        require(e.name in list_models(), "encoder.name", f"unknown model {e.name!r}; known: {', '.join(list_models())}")  # fmt: skip
        require(not e.model_kwargs, "encoder.model_kwargs", "applies to baselines (encoder.source=transformers|timm); a Pixio encoder takes embed_dim, depth, num_heads, n_cls_tokens")  # fmt: skip
    else:
        for key in PIXIO_ONLY:
            require(e.get(key) is None, f"encoder.{key}", f"applies to encoder.source=pixio only; a {e.source} baseline's architecture comes from its checkpoint and encoder.model_kwargs")  # fmt: skip
        require(not (e.source == "transformers" and e.img_size is not None), "encoder.img_size", "a transformers folder's config.json sets image_size (or encoder.model_kwargs.image_size)")  # fmt: skip
    if not (e.random_if_missing and not _has_checkpoint(e)):
        require(e.checkpoint is not None, "encoder.checkpoint", "is required (a frozen evaluation of random weights says nothing)")  # fmt: skip
        require(Path(e.checkpoint).exists(), "encoder.checkpoint", f"not found: {e.checkpoint}")
    if e.source == "pixio":
        return encoder_patch_size(e)
    require(not (e.img_size is not None and "img_size" in (e.model_kwargs or {})), "encoder.img_size", "is also set in encoder.model_kwargs.img_size: set one")  # fmt: skip
    try:  # the meta build checks the name, the folder's family and the arguments
        return build_meta_encoder(e).patch_size
    except BaselineError as err:
        raise ConfigError(f"encoder.{err.key}: {err}") from None


def check_random_weights(cfg: Any) -> None:
    """Random weights (`encoder.random_if_missing` without a checkpoint) are for the demo
    experiments only, which build their own data (`data.build_demo`); anywhere else a missing
    checkpoint is a ConfigError naming it, so a typo never evaluates random weights."""
    e = cfg.encoder
    if e.random_if_missing and not _has_checkpoint(e):
        found = "is null" if e.checkpoint is None else f"not found: {e.checkpoint}"
        require(cfg.data.build_demo, "encoder.checkpoint", f"{found} (random weights, encoder.random_if_missing, are for the demo experiments only, which set data.build_demo=true)")  # fmt: skip


def encoder_digest(cfg: Any) -> str | None:
    """The checkpoint's sha256 (`pixio.checkpoint.checkpoint_digest`) for the run's record and
    its resume check; None for a demo's random weights. Reads the whole file (a 5B checkpoint's
    22 GB: about 45 s at 500 MB/s; a training checkpoint directory: the per-file digests its
    manifest lists, a few kilobytes): call it once per job, on rank 0
    (`pixio.runtime.rank0.rank0_result`)."""
    if _has_checkpoint(cfg):
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
    if not _has_checkpoint(cfg):
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
