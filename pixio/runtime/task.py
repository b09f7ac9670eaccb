"""The contract between the shared training loop and a job's model wrapper.

Pre-training and distillation use the same `Trainer`; they differ only in the `Task` they hand it
(dinov3-style: distillation is a second meta-architecture, not a second trainer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


class Task(Protocol):
    """What the trainer needs from a job.

    `model` is the trainable module; the trainer wraps it (DDP / FSDP / compile) and passes the
    wrapped module back to `step`, so forward passes go through the wrappers' hooks.
    """

    model: nn.Module

    def step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Forward pass on one micro-batch; returns at least `loss` (scalar) plus extra metrics."""
        ...

    def batch_size(self, batch: Any) -> int:
        """Number of images in a micro-batch (for throughput)."""
        ...

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """Move a batch to the device."""
        ...

    def shard_units(self) -> list[nn.Module]:
        """Sub-modules to wrap as separate FSDP units (transformer blocks)."""
        ...

    def visualize(self, model: nn.Module, batch: Any) -> np.ndarray | None:
        """An (H, W, 3) uint8 picture of the model's current behaviour on `batch`, or None."""
        ...

    def export(self, state: dict[str, torch.Tensor], output_dir: Path) -> list[Path]:
        """Write the job's final artifacts (e.g. encoder.safetensors) from a full model state."""
        ...
