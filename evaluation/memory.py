"""How much device memory a depth / segmentation run needs on one GPU, so a grid of heads
(`head.lrs`) that cannot fit is refused at validation, not an hour into a SLURM job
(docs/evaluation.md, "Memory of a grid of heads").

What is counted, per GPU (nothing of a head run is sharded: every rank holds everything):
- the frozen encoder's weights (bf16 on GPUs under bf16 precision, else fp32) and, under
  no_grad, one block's activations at a time plus the feature maps the heads read;
- per head: its trainable state, 16 bytes per parameter (fp32 weights, gradients, AdamW's two
  moments), the bf16 copies autocast makes of its weights (2 bytes per parameter), and the
  activations autograd keeps for the backward, measured exactly by running the head on the
  meta device (no memory, no compute) with the training batch's shapes; K heads keep K of them,
  since one backward follows all K forwards;
- validation: the K heads' window outputs of one window batch and each head's accumulated
  prediction of the largest validation image allowed for (`VAL_PIXELS`, times the largest TTA
  scale squared).
The estimate leaves out the CUDA context, NCCL's buffers and the allocator's slack: a run is
refused when it exceeds `USABLE` of the GPU's memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evaluation.datasets import get_info
from evaluation.heads import DEPTH_BINS, build_head
from pixio.runtime.config import require

GIB = 1024**3
GPU_GIB = 80  # the reference's GPUs (A100 / H100 80 GB)
USABLE = 0.9  # of a GPU's memory; the rest: CUDA context, NCCL buffers, allocator slack
STATE_BYTES = 16  # per trainable parameter: fp32 weight, gradient, AdamW's exp_avg, exp_avg_sq
VAL_PIXELS = 1024 * 2048  # the largest validation image allowed for (LoveDA's are 1024 x 1024)
BLOCK_WIDTHS = 10  # live (tokens, D) tensors in one block under no_grad: x, norm, qkv, attn, mlp 4D


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one run, by part (see the module's docstring)."""

    heads: int
    head_params: int  # parameters of one head
    encoder_weights: int
    encoder_activations: int  # training batch or validation windows, whichever is larger
    per_head_state: int  # trainable state + autocast copies of one head
    per_head_activations: int  # saved for the backward, one head at the training batch
    per_head_validation: int  # one head's window outputs and image accumulator

    @property
    def per_head(self) -> int:
        return self.per_head_state + self.per_head_activations + self.per_head_validation

    @property
    def total(self) -> int:
        return self.encoder_weights + self.encoder_activations + self.heads * self.per_head

    def max_heads(self, budget: int) -> int:
        """The largest number of heads whose total fits in `budget` bytes (0: not even one)."""
        room = budget - self.encoder_weights - self.encoder_activations
        return max(0, room // self.per_head)

    def summary(self) -> str:
        """`4 heads: 6.1 GiB = encoder 1.3 + 0.2 + 4 x 1.15 (state 0.60, activations 0.19, ...)`."""
        g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        return (f"{self.heads} head(s) of {self.head_params / 1e6:.1f}M parameters: {g(self.total)} GiB "
                f"= encoder {g(self.encoder_weights)} + its activations {g(self.encoder_activations)} "
                f"+ {self.heads} x {g(self.per_head)} (state {g(self.per_head_state)}, activations "
                f"{g(self.per_head_activations)}, validation {g(self.per_head_validation)})")  # fmt: skip


def saved_activation_bytes(head: nn.Module, features: Sequence[torch.Tensor], size: tuple[int, int] | None) -> int:  # fmt: skip
    """Bytes of the tensors autograd keeps for the backward of `head(features, size)`, each
    storage counted once; the head's parameters and buffers (its state, counted apart) left
    out. Works on the meta device, where it costs no memory and no compute."""
    params = {t.untyped_storage()._cdata for t in (*head.parameters(), *head.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            kept[key] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head(list(features), size)
    return sum(kept.values())


def estimate_memory(
    kind: str,
    embed_dim: int,
    encoder_params: int,
    out_channels: int,
    *,
    heads: int,
    batch: int,
    crop: int,
    window: int,
    window_batch: int,
    patch: int,
    n_cls_tokens: int = 8,
    bf16: bool = True,
    tta_scale: float = 1.0,
    val_pixels: int = VAL_PIXELS,
    bins: bool = False,
) -> MemoryEstimate:
    """Bytes per GPU of `heads` heads of `kind` (out_channels each: 1 for depth, the classes for
    segmentation; `bins`: a bins depth head of `out_channels` bins, whose depth is formed at the
    head's own resolution, then upsampled) on a frozen encoder of `embed_dim` x
    `encoder_params` at `batch` crops of `crop` px, validated with `window_batch` windows of
    `window` px."""
    act = 2 if bf16 else 4  # bytes of an activation (autocast's bf16, or fp32)
    blocks = 4 if kind == "dpt" else 1
    side = crop // patch
    with torch.device("meta"):
        head = build_head(kind, embed_dim, out_channels).to(torch.bfloat16 if bf16 else torch.float32)  # fmt: skip
        features = [torch.empty(batch, 2 * embed_dim, side, side, dtype=head_dtype(head)) for _ in range(blocks)]  # fmt: skip
    params = sum(p.numel() for p in head.parameters())
    saved = saved_activation_bytes(head, features, None if bins else (crop, crop))
    outputs = 1 if bins else out_channels  # channels of the prediction at full resolution
    loss = 2 * batch * outputs * crop * crop * 4  # the fp32 output and the loss's own copy
    tokens = lambda n, s: n * ((s // patch) ** 2 + n_cls_tokens)  # noqa: E731
    encoder_live = max(tokens(batch, crop), tokens(window_batch, window)) * embed_dim * act * BLOCK_WIDTHS  # fmt: skip
    kept_maps = blocks * max(batch * side**2, window_batch * (window // patch) ** 2) * 2 * embed_dim * act  # fmt: skip
    window_out = window_batch * outputs * window * window * 4 * 2  # outputs, then concatenated
    accumulate = math.ceil(val_pixels * tta_scale**2) * outputs * 4 * 2  # a pass and the sum
    return MemoryEstimate(
        heads=heads, head_params=params, encoder_weights=encoder_params * act,
        encoder_activations=encoder_live + kept_maps,
        per_head_state=params * (STATE_BYTES + (2 if bf16 else 0)),
        per_head_activations=saved + loss, per_head_validation=window_out + accumulate,
    )  # fmt: skip


def head_dtype(head: nn.Module) -> torch.dtype:
    """The dtype of a head's first parameter."""
    return next(head.parameters()).dtype


def budget_bytes(gpu_gib: float = GPU_GIB) -> int:
    """The bytes a run may use on a GPU of `gpu_gib` GiB (`USABLE` of it)."""
    return int(gpu_gib * GIB * USABLE)


def check_memory(cfg: Any, app: str, patch: int, sizes: dict[str, int]) -> None:
    """ConfigError naming head.lrs when a GPU run's heads and frozen encoder (`config_estimate`)
    need more than an 80 GB GPU leaves a run, with how many heads would fit. CPU runs pass."""
    if cfg.train.device == "cpu":
        return
    estimate = config_estimate(cfg, app, patch, sizes)
    budget = budget_bytes(GPU_GIB)
    require(estimate.total <= budget, "head.lrs", f"{estimate.summary()} per GPU, over the {budget / GIB:.0f} GiB an {GPU_GIB} GB GPU leaves a run; {estimate.max_heads(budget)} head(s) fit: use fewer lrs, or several runs")  # fmt: skip


def config_estimate(cfg: Any, app: str, patch: int, sizes: dict[str, int]) -> MemoryEstimate:
    """`estimate_memory` of an app config: the encoder's width and size from its meta build,
    the heads of head.lrs, the crop / window `sizes` (`evaluation.common.protocol_sizes`)."""
    from evaluation.features import build_meta_encoder

    encoder = build_meta_encoder(cfg.encoder)
    params = sum(p.numel() for p in encoder.parameters())
    bins = app == "depth" and cfg.head.depth_output == "bins"
    out = DEPTH_BINS if bins else 1 if app == "depth" else get_info(cfg.dataset.name).num_classes
    scale = max(cfg.eval.tta_scales) if cfg.eval.tta == "multiscale" else 1.0
    return estimate_memory(cfg.head.name, encoder.embed_dim, params, out, heads=len(cfg.head.lrs or [0]),
                           batch=cfg.train.batch_size, crop=sizes["crop_size"], window=sizes["window"],
                           window_batch=cfg.eval.window_batch, patch=patch,
                           n_cls_tokens=getattr(encoder, "n_cls_tokens", 1),
                           bf16=cfg.train.precision == "bf16", tta_scale=scale, bins=bins)  # fmt: skip
