"""Pre-training task: the Pixio MAE handed to the shared trainer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pixio.architecture import model_architecture
from pixio.checkpoint import (
    StateMismatchError,
    broadcast_checked_state,
    check_architecture,
    encoder_state,
    read_state_dict,
    save_state_dict,
)
from pixio.data.loader import images_and_noise
from pixio.models.flops import mae_model_flops
from pixio.models.mae import PixioMAE
from pixio.runtime.config import ConfigError
from pixio.runtime.distributed import is_main
from pixio.runtime.prefetch import normalize_batch
from pixio.runtime.task import ModuleSpec, OptimizerSpec, Periodic, StepOutput, Task
from pretraining.vis import reconstruction_picture, reconstruction_rows

log = logging.getLogger("pixio.pretrain")
MODULE = "mae"  # the checkpoint's section name for the MAE (model.mae.*, optimizer.mae.*)


class MAETask(Task):
    """Masked pixel reconstruction with one AdamW over the whole MAE. A batch is an image tensor
    (B, 3, H, W) or a dict with `image` and optionally `noise` (B, num_groups), which fixes the
    masking (used by tests)."""

    def __init__(
        self,
        model: PixioMAE,
        mask_ratio: float,
        optim: Any,
        name: str | None = None,
        init_from: str | None = None,
    ) -> None:
        self.model = model
        self.mask_ratio = mask_ratio
        self.optim = optim  # the `optim` config node
        self.name = name  # registry name, recorded in encoder.safetensors
        self.init_from = init_from  # initial weights of a fresh run (train.init_from)
        self._periodic: list[Periodic] = []

    def modules(self) -> dict[str, ModuleSpec]:
        units = [*self.model.blocks, *self.model.decoder_blocks]
        load = init_loader(self.init_from) if self.init_from else None
        return {MODULE: ModuleSpec(self.model, shard_units=units, load=load)}

    def monitor(self, run: Callable[[nn.Module], dict[str, float]] | None, every: int) -> None:
        """Run `run` (the online k-NN monitor) on the MAE every `every` iterations."""
        if run is not None:
            self._periodic.append(Periodic(every, lambda modules: run(modules[MODULE])))

    def periodic(self) -> Sequence[Periodic]:
        return self._periodic

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {MODULE: OptimizerSpec((MODULE,), self.optim)}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch on `device`, its uint8 images normalised there (pixio.runtime.prefetch)."""
        return normalize_batch(super().to_device(batch, device))

    def step(self, modules: dict[str, nn.Module], batch: Any) -> StepOutput:
        imgs, noise = images_and_noise(batch)
        out = modules[MODULE](imgs, mask_ratio=self.mask_ratio, noise=noise)
        return StepOutput(out.loss)

    def flops_per_sample(self, batch: Any) -> float:
        """The MAE's training FLOPs per image at the batch's image size (pixio.models.flops)."""
        height, width = images_and_noise(batch)[0].shape[-2:]
        return float(mae_model_flops(self.model, height, width, self.mask_ratio).train)

    @torch.no_grad()
    def pictures(self, modules: dict[str, nn.Module], batch: Any) -> dict[str, np.ndarray]:
        imgs, noise = images_and_noise(batch)
        imgs = imgs[:8]
        noise = None if noise is None else noise[:8]
        out = modules[MODULE](imgs, mask_ratio=self.mask_ratio, noise=noise)
        if not is_main():  # every rank ran the forward (FSDP); rank 0's picture is written
            return {}
        rows = reconstruction_rows(
            imgs.float().cpu(), out.pred.float().cpu(), out.mask.float().cpu(),
            self.model.patch_size, norm_pix_loss=self.model.norm_pix_loss,
        )  # fmt: skip
        title = f"MAE reconstructions of training images (loss {float(out.loss):.3f})"
        return {"reconstruction": reconstruction_picture(rows, self.mask_ratio, title)}

    def export(self, states: dict[str, dict[str, torch.Tensor]], output_dir: Path) -> list[Path]:
        """encoder.safetensors: the encoder, its architecture in the file's metadata."""
        arch = model_architecture(self.model, self.name) | {"kind": "encoder"}
        encoder = encoder_state(states[MODULE])
        return [save_state_dict(encoder, Path(output_dir) / "encoder.safetensors", arch)]


def init_loader(path: str) -> Callable[[nn.Module], None]:
    """`ModuleSpec.load` of `train.init_from`: rank 0 reads the full MAE (a full file or a
    pre-training checkpoint dir, verified) and checks it strictly, the weights are broadcast
    into the placed module; a mismatch is a `train.init_from` config error on every rank."""

    def load(module: nn.Module) -> None:
        def read() -> dict[str, torch.Tensor]:
            check_architecture(module, path)
            return read_state_dict(path)

        try:
            broadcast_checked_state(module, read, path)
        except (StateMismatchError, ValueError) as err:
            raise ConfigError(f"train.init_from: {err}") from None
        log.info("initial weights from train.init_from=%s", path)

    return load
