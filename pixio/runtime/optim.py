"""AdamW with the reference decay/no-decay split, and the per-iteration lr schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """SPEC rule: no weight decay for parameters with ndim <= 1 or names ending in `.bias`.
    Everything else is decayed, including cls_token, mask_token and the position tables."""
    return param.ndim <= 1 or name.endswith(".bias")


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and of those that do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, no-decay first (the reference order); groups with no parameters are
    left out. Frozen parameters (requires_grad False) are not included."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    groups = [
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def _on_cuda(model: nn.Module) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "cuda"


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; `fused` None means on when the parameters live on CUDA
    (call after moving the model to its device)."""
    if fused is None:
        fused = _on_cuda(model)
    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


def lr_at(
    epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float
) -> float:
    """lr at fractional `epoch` (= epoch + iteration / iters_per_epoch): linear warmup from 0
    over `warmup_epochs`, then half-cycle cosine from base_lr down to min_lr at `epochs`."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if epoch >= epochs:
        return min_lr
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, multiplied by the group's optional `lr_scale` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def resolve_lr(lr: float | None, blr: float, global_batch: int) -> float:
    """Absolute lr: `lr` when given, else the linear scaling rule blr * global_batch / 256."""
    return lr if lr is not None else blr * global_batch / 256
