"""Pre-training task: the Pixio MAE handed to the shared trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pixio.checkpoint import encoder_state, save_state_dict
from pixio.models.mae import PixioMAE
from pixio.runtime.vis import reconstruction_grid


class MAETask:
    """Masked pixel reconstruction. A batch is an image tensor (B, 3, H, W) or a dict with `image`
    and optionally `noise` (B, num_groups), which fixes the masking (used by tests)."""

    def __init__(self, model: PixioMAE, mask_ratio: float) -> None:
        self.model = model
        self.mask_ratio = mask_ratio

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, dict):
            return batch["image"], batch.get("noise")
        return batch, None

    def step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        imgs, noise = self._unpack(batch)
        out = model(imgs, mask_ratio=self.mask_ratio, noise=noise)
        return {"loss": out.loss}

    def batch_size(self, batch: Any) -> int:
        return int(self._unpack(batch)[0].shape[0])

    def to_device(self, batch: Any, device: torch.device) -> Any:
        if isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return batch.to(device, non_blocking=True)

    def shard_units(self) -> list[nn.Module]:
        return [*self.model.blocks, *self.model.decoder_blocks]

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: Any) -> np.ndarray | None:
        imgs, noise = self._unpack(batch)
        imgs = imgs[:8]
        out = model(imgs, mask_ratio=self.mask_ratio, noise=None if noise is None else noise[:8])
        return reconstruction_grid(
            imgs.float().cpu(), out.pred.float().cpu(), out.mask.float().cpu(),
            self.model.patch_size, norm_pix_loss=self.model.norm_pix_loss,
        )  # fmt: skip

    def export(self, state: dict[str, torch.Tensor], output_dir: Path) -> list[Path]:
        return [save_state_dict(encoder_state(state), Path(output_dir) / "encoder.safetensors")]
