"""The optimisers (AdamW with the reference decay/no-decay split; LARS, MAE's linear-probe
optimiser), chosen by `optim.name`, and the per-iteration lr schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pixio.runtime.choices import OPTIMIZERS, SCHEDULES


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """The reference rule: no weight decay for parameters with ndim <= 1 or names ending in `.bias`.
    Everything else is decayed, including cls_token, mask_token and the position tables."""
    return param.ndim <= 1 or name.endswith(".bias")


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and of those that do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(name)
    return decay, no_decay


def param_groups(
    model: nn.Module, weight_decay: float, decay_all: bool = False
) -> list[dict[str, Any]]:
    """Two AdamW groups, no-decay first (the reference order); groups with no parameters are
    left out. Frozen parameters (requires_grad False) are not included. `decay_all`: one group,
    every trainable parameter decayed (the evaluation heads' reference optimiser)."""
    if decay_all:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [{"params": trainable, "weight_decay": weight_decay}] if trainable else []
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
    decay_all: bool = False,
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; `fused` None means on when the parameters live on CUDA
    (call after moving the model to its device)."""
    if fused is None:
        fused = _on_cuda(model)
    groups = param_groups(model, weight_decay, decay_all)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as MAE's linear
    probe uses it. Per parameter of a group with `adapt` (weight matrices): d = grad + wd * p,
    scaled by the trust ratio trust_coefficient * ||p|| / ||d|| (1 when either norm is 0);
    groups without `adapt` (biases, 1-d parameters) use d = grad, neither decayed nor scaled.
    Then mu = momentum * mu + d and p -= lr * mu. The ratio stays on the device (no host read)."""

    def __init__(
        self,
        params: Any,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, adapt=True)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        d = p.grad
        if group["adapt"]:
            d = d.add(p, alpha=group["weight_decay"])
            p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            ratio = group["trust_coefficient"] * p_norm / d_norm  # inf / NaN where a norm is 0
            d = d.mul(torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio)))
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        state["mu"].mul_(group["momentum"]).add_(d)
        p.add_(state["mu"], alpha=-group["lr"])


def build_lars(model: nn.Module, lr: float, weight_decay: float) -> LARS:
    """LARS over the trainable parameters: biases and 1-d parameters (`is_no_decay`) in a group
    without adaptation or decay, the others with both (MAE's LARS adapts ndim > 1)."""
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model)
    groups = [
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "adapt": False},
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "adapt": True},
    ]
    return LARS([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def optimizer_from_config(model: nn.Module, o: Any, lr: float) -> torch.optim.Optimizer:
    """The optimiser an `optim` config node names (`name`: adamw | lars; absent: adamw) over
    `model`'s trainable parameters, at `lr`."""
    name = getattr(o, "name", "adamw")
    if name == "lars":
        return build_lars(model, lr, o.weight_decay)
    if name != "adamw":
        raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    decay_all = getattr(o, "decay_all", False)  # absent from older config nodes
    return build_optimizer(model, lr, o.weight_decay, tuple(o.betas), o.fused, decay_all)


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


@dataclass(frozen=True)
class Schedule:
    """Per-iteration lr as a function of the fractional epoch (= iteration / iters_per_epoch):
    linear warmup from 0 over `warmup_epochs`, then `kind`:
    cosine: half-cycle cosine from base_lr to min_lr at `epochs` (pre-training, distillation);
    poly: min_lr + (base_lr - min_lr) * (1 - progress) ** power over the post-warmup part
    (depth: 10 % warmup; segmentation: no warmup); constant: base_lr."""

    kind: str
    base_lr: float
    epochs: float
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    power: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")

    def __call__(self, epoch: float) -> float:
        if self.kind == "cosine":  # the reference's formula, kept verbatim (lr_at)
            return lr_at(epoch, self.base_lr, self.min_lr, self.warmup_epochs, self.epochs)
        if epoch < self.warmup_epochs:
            return self.base_lr * epoch / self.warmup_epochs
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs))
        return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress) ** self.power


def schedule_from_config(o: Any, base_lr: float, epochs: float) -> Schedule:
    """The `Schedule` of an `optim` config node (`schedule`, `warmup_epochs` or
    `warmup_fraction`, `min_lr`, `poly_power`) for a run of `epochs` epochs."""
    fraction = getattr(o, "warmup_fraction", None)
    warmup = fraction * epochs if fraction is not None else o.warmup_epochs
    return Schedule(
        kind=getattr(o, "schedule", "cosine"), base_lr=base_lr, epochs=epochs,
        warmup_epochs=warmup, min_lr=o.min_lr, power=getattr(o, "poly_power", 0.9),
    )  # fmt: skip
