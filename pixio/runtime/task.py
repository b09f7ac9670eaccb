"""The contract between the shared `Trainer` and a job: what every job hands the training loop.

Pre-training, evaluation heads and distillation run the same `Trainer`; they differ only in the
`Task` they hand it (dinov3-style: distillation is a second meta-architecture, not a second
trainer). A task declares its modules (trainable or frozen, with their FSDP units), its
optimisers (one per trainable group, each with its own `optim` config: lr, schedule, scaler,
clipping), and the loss of one micro-batch; optional hooks add validation, pictures, periodic
evaluations, model FLOPs (for the logged TFLOP/s and MFU) and exported artifacts. See
docs/DESIGN.md, "Trainer and tasks", for a complete small example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ModuleSpec:
    """One module of a task and how the trainer treats it.

    Trainable modules are wrapped (DDP or FSDP, chosen per module from its size unless `parallel`
    says otherwise), optimised and checkpointed. Frozen modules get `requires_grad=False` and eval
    mode, never enter an optimiser or a checkpoint, run in bf16 on GPUs under bf16 precision, and
    are sharded (FSDP) only when their weights would not comfortably fit replicated.
    """

    module: nn.Module  # built on the meta device (materialised by the trainer) or on the CPU
    trainable: bool = True  # False: frozen (a teacher, a frozen encoder)
    shard_units: Sequence[nn.Module] = ()  # sub-modules sharded as separate FSDP units (blocks)
    parallel: str = "auto"  # auto | none | ddp | fsdp; auto: train.parallel, then by size
    group: dist.ProcessGroup | None = None  # replicate / shard within this group (None: all ranks)
    forward_methods: tuple[str, ...] = ()  # methods besides forward() the task calls (FSDP hooks)
    load: Callable[[nn.Module], None] | None = None  # fills a materialised frozen module's weights


@dataclass
class OptimizerSpec:
    """One optimiser (`optim.name`: AdamW or LARS) over the trainable parameters of `modules`,
    with its own schedule and scaler.

    `optim` is an `optim` config node (pixio.runtime.config.OptimConfig): name, lr or blr,
    schedule, warmup, min_lr, weight decay, betas, clip_grad, fused.
    """

    modules: tuple[str, ...]  # names of trainable modules (keys of Task.modules())
    optim: Any  # OptimConfig (dataclass or DictConfig)


@dataclass
class Validation:
    """How a task's validation results are ranked: `metric` (a key of `Task.summarize`'s
    output) is better when larger (`mode="max"`) or smaller (`"min"`)."""

    metric: str
    mode: str = "max"

    def better(self, value: float, best: float | None) -> bool:
        """True when `value` beats `best`; a non-finite result never beats a finite one (a NaN
        from an early validation must not stay the best forever)."""
        if best is None or not math.isfinite(best):
            return best is None or math.isfinite(value)
        if not math.isfinite(value):
            return False
        return value > best if self.mode == "max" else value < best


@dataclass
class Periodic:
    """An evaluation the trainer runs every `every` iterations, on every rank at the same
    iteration (so `run` may be collective), under eval mode, no gradients and autocast; `run`
    gets the wrapped modules by name and returns scalars, the same on every rank, logged to
    metrics.jsonl and wandb (e.g. pre-training's `monitor/knn_top1`)."""

    every: int
    run: Callable[[dict[str, nn.Module]], dict[str, float]]


@dataclass
class StepOutput:
    """What `Task.step` returns: the loss to minimise and scalars to log (means over the log
    window and over ranks). `losses` (one per optimiser name) is needed only with fp16 and more
    than one optimiser, where each optimiser's gradient scaler scales its own loss."""

    loss: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    losses: Mapping[str, torch.Tensor] | None = None


class Task:
    """Base class of a job's model wrapper. Override `modules`, `optimizers` and `step`; the
    other hooks have working defaults (no validation, no pictures, no exports)."""

    validation: Validation | None = None  # set it to enable `validate` / `summarize`

    def modules(self) -> dict[str, ModuleSpec]:
        """Every module the task uses, by name (names key the checkpoint's sections)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, OptimizerSpec]:
        """The optimisers, by name (used in logs: `lr/<name>`, `grad_norm/<name>`)."""
        raise NotImplementedError

    def step(self, modules: dict[str, nn.Module], batch: Any) -> StepOutput:
        """Forward one micro-batch through `modules` (the wrapped modules, by name)."""
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        """Samples in a micro-batch (throughput, samples_seen): the first tensor's length."""
        return int(_first_tensor(batch).shape[0])

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move every tensor in a (nested) batch to `device`."""
        return _to_device(batch, device)

    def validate(self, modules: dict[str, nn.Module], batch: Any) -> dict[str, torch.Tensor]:
        """Per-sample additive statistics of one validation batch: each value has a leading
        dimension of the batch size (e.g. (B,) errors, (B, K, K) confusion matrices). The
        trainer sums them over real samples and ranks (each sample counted once)."""
        raise NotImplementedError

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics from the summed statistics (plus `samples`, the number of samples)."""
        raise NotImplementedError

    def flops_per_sample(self, batch: Any) -> float | None:
        """Model FLOPs of one training sample of `batch` (forward + backward, as
        `pixio.models.flops` counts them), from which the trainer logs `tflops` and `mfu`.
        None (the default): unknown, neither is logged. Called at log time; only the batch's
        shapes may be read (a device value would make the host wait)."""
        return None

    def pictures(self, modules: dict[str, nn.Module], batch: Any) -> dict[str, np.ndarray]:
        """(H, W, 3) uint8 pictures of the current behaviour on `batch`, by name."""
        return {}

    def periodic(self) -> Sequence[Periodic]:
        """Evaluations to run during training, each every `Periodic.every` iterations."""
        return ()

    def export(self, states: dict[str, dict[str, torch.Tensor]], output_dir: Path) -> list[Path]:
        """Write final artifacts from the trainable modules' full states; returns the paths."""
        return []


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in a batch of type {type(batch).__name__}")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
