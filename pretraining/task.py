"""Pre-training task: the Pixio MAE handed to the shared trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pixio.checkpoint import encoder_state, save_state_dict
from pixio.data.loader import images_and_noise
from pixio.models.mae import PixioMAE
from pixio.runtime.task import ModuleSpec, OptimizerSpec, StepOutput, Task
from pretraining.vis import reconstruction_grid

MODULE = "mae"  # the checkpoint's section name for the MAE (model.mae.*, optimizer.mae.*)


class MAETask(Task):
    """Masked pixel reconstruction with one AdamW over the whole MAE. A batch is an image tensor
    (B, 3, H, W) or a dict with `image` and optionally `noise` (B, num_groups), which fixes the
    masking (used by tests)."""

    def __init__(self, model: PixioMAE, mask_ratio: float, optim: Any) -> None:
        self.model = model
        self.mask_ratio = mask_ratio
        self.optim = optim  # the `optim` config node

    def modules(self) -> dict[str, ModuleSpec]:
        units = [*self.model.blocks, *self.model.decoder_blocks]
        return {MODULE: ModuleSpec(self.model, shard_units=units)}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {MODULE: OptimizerSpec((MODULE,), self.optim)}

    def step(self, modules: dict[str, nn.Module], batch: Any) -> StepOutput:
        imgs, noise = images_and_noise(batch)
        out = modules[MODULE](imgs, mask_ratio=self.mask_ratio, noise=noise)
        return StepOutput(out.loss)

    @torch.no_grad()
    def pictures(self, modules: dict[str, nn.Module], batch: Any) -> dict[str, np.ndarray]:
        imgs, noise = images_and_noise(batch)
        imgs = imgs[:8]
        noise = None if noise is None else noise[:8]
        out = modules[MODULE](imgs, mask_ratio=self.mask_ratio, noise=noise)
        grid = reconstruction_grid(
            imgs.float().cpu(), out.pred.float().cpu(), out.mask.float().cpu(),
            self.model.patch_size, norm_pix_loss=self.model.norm_pix_loss,
        )  # fmt: skip
        return {"reconstruction": grid}

    def export(self, states: dict[str, dict[str, torch.Tensor]], output_dir: Path) -> list[Path]:
        encoder = encoder_state(states[MODULE])
        return [save_state_dict(encoder, Path(output_dir) / "encoder.safetensors")]
