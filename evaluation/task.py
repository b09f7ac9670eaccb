"""The frozen-encoder head tasks handed to the shared trainer: depth (SiLog on sigmoid * max_depth)
and semantic segmentation (cross-entropy, ignore 255).

Modules: `encoder` (`FrozenFeatures`, frozen: eval mode, no gradients, bf16 on GPUs, only the
blocks the head reads) and `head` (trainable; one AdamW). Validation runs the full image through
batched sliding windows (the protocol) and returns per-image statistics that the trainer sums
over real samples and ranks: each image counts once however the set is split. The first
`vis_images` validation images are drawn at every validation (`vis/val_<index>.png`, the latest
validation; at the end, the final weights).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evaluation.features import FrozenFeatures
from evaluation.heads import DPTHead
from evaluation.inference import sliding_window
from evaluation.metrics import (
    MIN_VALID_PIXELS,
    depth_metric_sums,
    depth_valid_mask,
    segmentation_stats,
    silog_loss,
    summarize_depth,
    summarize_segmentation,
)
from evaluation.vis import depth_picture, segmentation_picture
from pixio.models.encoder import PixioEncoder
from pixio.models.flops import ViTSpec, eval_flops
from pixio.runtime.distributed import is_main
from pixio.runtime.job import DataError
from pixio.runtime.parallel import unwrap
from pixio.runtime.prefetch import normalize_batch
from pixio.runtime.task import ModuleSpec, OptimizerSpec, StepOutput, Task, Validation
from pixio.runtime.vis import save_png

log = logging.getLogger("pixio.eval")
IGNORE_INDEX = 255


@dataclass
class Windows:
    """Sliding-window inference settings (the `eval` config group)."""

    window: int = 256
    stride: int = 170
    window_batch: int = 16


def share_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as in the checkpoint. SyncBatchNorm
    (GPUs) keeps them equal anyway; plain BatchNorm under DDP (CPU runs) updates them per rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class HeadTask(Task):
    """A frozen encoder and a trainable head; subclasses give the loss, the per-window output
    and the per-image statistics."""

    reduce = "mean"  # how overlapping window outputs combine (sliding_window's `reduce`)

    def __init__(
        self,
        features: FrozenFeatures,
        head: nn.Module,
        optim: Any,
        windows: Windows,
        vis_dir: str | Path | None = None,
        vis_images: int = 0,
        val_source: str = "the validation split",
    ) -> None:
        self.features, self.head, self.optim, self.windows = features, head, optim, windows
        self.vis_dir = None if vis_dir is None else Path(vis_dir)
        self.vis_images = vis_images
        self.val_source = val_source  # names the split in errors, e.g. "kitti val split (<list>)"
        # Training iterations done when the head was last stepped (the batches' `iteration`,
        # common.IterationLoader); the pictures' titles say it (None: none in this process).
        self.steps_done: int | None = None

    def modules(self) -> dict[str, ModuleSpec]:
        # Replicated, never sharded: validation ranks run different window counts, and an FSDP
        # module needs every rank in every forward.
        blocks = list(self.features.encoder.blocks)  # bf16 weights on GPUs (the root stays fp32)
        encoder = ModuleSpec(self.features, trainable=False, parallel="none", shard_units=blocks)
        return {"encoder": encoder, "head": ModuleSpec(self.head)}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {"head": OptimizerSpec(("head",), self.optim)}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch on `device`, its uint8 images normalised there (pixio.runtime.prefetch)."""
        return normalize_batch(super().to_device(batch, device))

    @staticmethod
    def logits(encoder: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Head output (B, C, H, W) at the input size; the encoder keeps no activations."""
        with torch.no_grad():
            features = encoder(images)
        return head(features, tuple(images.shape[-2:]))

    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        out = self.logits(modules["encoder"], modules["head"], batch["image"])
        if "iteration" in batch:
            self.steps_done = int(batch["iteration"][0]) + 1
        return StepOutput(self.loss(out.float(), batch))

    def validate(self, modules: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        """Per image (validation images differ in size): full-image prediction, statistics."""
        # The bare head (torch.compile and DDP removed): ranks run different numbers of
        # windows, and DDP's forward may broadcast buffers (a collective) on each call.
        encoder, head = modules["encoder"], unwrap(modules["head"])
        share_buffers(head)

        def predict(windows: torch.Tensor) -> torch.Tensor:
            return self.window_output(self.logits(encoder, head, windows).float())

        rows = []
        for i in range(batch["image"].shape[0]):
            sample = {k: v[i] for k, v in batch.items()}
            w = self.windows
            pred = sliding_window(
                predict, sample["image"], w.window, w.stride, w.window_batch, self.reduce
            )
            rows.append(self.image_stats(pred, sample))
            self._maybe_draw(sample, pred, rows[-1])
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _maybe_draw(self, sample: dict, pred: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:  # fmt: skip
        index = int(sample["index"])
        if self.vis_dir is not None and index < self.vis_images:
            title = f"validation image {index}, {self._step_text()}: {self.metric_text(stats)}"
            save_png(self.picture(sample, pred, title), self.vis_dir / f"val_{index}.png")

    def _step_text(self, steps: int | None = None) -> str:
        steps = self.steps_done if steps is None else steps
        return "the loaded weights" if steps is None else f"step {steps}"

    def flops_per_sample(self, batch: dict) -> float | None:
        """Training FLOPs per crop (pixio.models.flops): the frozen encoder's forward up to the
        deepest block the head reads, the head's forward and backward. None for a baseline
        encoder (its embedding differs from a Pixio ViT's)."""
        encoder = self.features.encoder
        if not isinstance(encoder, PixioEncoder):
            return None
        kind = "dpt" if isinstance(self.head, DPTHead) else "linear"
        height, width = batch["image"].shape[-2:]
        blocks = max(self.features.block_ids) + 1
        flops = eval_flops(ViTSpec.of(encoder), kind, self.out_channels, height, width, blocks)
        return float(flops.train)

    @torch.no_grad()
    def pictures(self, modules: dict[str, nn.Module], batch: dict) -> dict[str, np.ndarray]:
        """The first training crop of the batch: input, prediction, ground truth, titled with
        the step and the crop's metric. Every rank runs the forward (the wrapped head may need
        all ranks); only rank 0, whose pictures the trainer writes, renders."""
        image = batch["image"][:1]
        out = self.window_output(self.logits(modules["encoder"], modules["head"], image).float())
        if not is_main():
            return {}
        sample = {k: v[0] for k, v in batch.items()}
        steps = int(sample["iteration"]) + 1 if "iteration" in sample else None
        metric = self.metric_text(self.image_stats(out[0], sample))
        title = f"training crop, {self._step_text(steps)}: {metric}"
        return {"train_crop": self.picture(sample, out[0], title)}

    # ---- what a subclass says ------------------------------------------------------------
    out_channels = 1  # the head's output channels (depth: 1; segmentation: the classes)

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def window_output(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-window output that sliding windows combine (depth in metres, probabilities)."""
        raise NotImplementedError

    def image_stats(self, pred: torch.Tensor, sample: dict) -> dict[str, torch.Tensor]:
        """(1, ...) statistics of one image from its full prediction (C, H, W)."""
        raise NotImplementedError

    def metric_text(self, stats: dict[str, torch.Tensor]) -> str:
        """One image's metric for a picture's title, from its `image_stats`."""
        raise NotImplementedError

    def picture(self, sample: dict, pred: torch.Tensor, title: str) -> np.ndarray:
        raise NotImplementedError


class DepthTask(HeadTask):
    """Monocular depth: prediction = sigmoid(head) * max_depth; SiLog loss (lambda 0.5) on the
    prediction clamped at min_depth; validation metrics averaged over images (d1 ranks)."""

    validation = Validation("d1", mode="max")
    reduce = "mean"

    def __init__(self, *args: Any, min_depth: float, max_depth: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_depth, self.max_depth = min_depth, max_depth

    def window_output(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) * self.max_depth

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        pred = self.window_output(out).clamp_min(self.min_depth)
        target = batch["depth"].float()
        valid = depth_valid_mask(target, self.min_depth, self.max_depth)
        return silog_loss(pred, target, valid)

    def image_stats(self, pred: torch.Tensor, sample: dict) -> dict[str, torch.Tensor]:
        target = sample["depth"].float()
        return depth_metric_sums(pred[None], target[None], self.min_depth, self.max_depth)

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-image means; DataError when no image has a valid target (every metric would be
        NaN, and so would the best result)."""
        if not float(totals["count"]):
            raise DataError(
                f"{self.val_source}: none of its {int(totals['samples'])} images has "
                f"{MIN_VALID_PIXELS} or more valid depth pixels (in [{self.min_depth}, "
                f"{self.max_depth}] m): its depth pngs are empty or in another unit; check them "
                "with python -m evaluation.prepare DATASET ROOT --verify"
            )
        return {**summarize_depth(totals), "samples": float(totals["samples"])}

    def metric_text(self, stats: dict[str, torch.Tensor]) -> str:
        if not float(stats["count"].sum()):
            return f"fewer than {MIN_VALID_PIXELS} valid depth pixels"
        m = summarize_depth({k: v.sum() for k, v in stats.items()})
        return f"d1 {m['d1']:.1f} %, abs_rel {m['abs_rel']:.3f}, rmse {m['rmse']:.3g} m"

    def picture(self, sample: dict, pred: torch.Tensor, title: str) -> np.ndarray:
        return depth_picture(sample["image"], pred, sample["depth"], self.max_depth, title)


class SegmentationTask(HeadTask):
    """Semantic segmentation: cross-entropy (ignore 255); validation sums the softmax
    probabilities of the windows, takes the argmax, and accumulates per-class intersections and
    unions over the whole set (mIoU ranks)."""

    validation = Validation("miou", mode="max")
    reduce = "sum"

    def __init__(
        self,
        *args: Any,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes, self.class_names = num_classes, class_names
        self.out_channels = num_classes

    def window_output(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        mask = batch["mask"].long()
        # Mean over labelled pixels; a crop with none (all padding / no-data) gives 0, not NaN.
        total = F.cross_entropy(out, mask, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (mask != IGNORE_INDEX).sum().clamp_min(1)

    def image_stats(self, pred: torch.Tensor, sample: dict) -> dict[str, torch.Tensor]:
        labels = pred.argmax(0)
        return segmentation_stats(labels[None], sample["mask"][None], self.num_classes)

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """mIoU over the set; DataError when no pixel of any mask is labelled (mIoU is NaN)."""
        if not float(totals["target_area"].sum()):
            raise DataError(
                f"{self.val_source}: every pixel of its {int(totals['samples'])} masks is "
                f"{IGNORE_INDEX} (ignored) once read: the masks are empty or data.label_format "
                "does not match them; check them with python -m evaluation.prepare DATASET ROOT "
                "--verify"
            )
        return {**summarize_segmentation(totals), "samples": float(totals["samples"])}

    def metric_text(self, stats: dict[str, torch.Tensor]) -> str:
        if not float(stats["target_area"].sum()):
            return "no labelled pixel"
        m = summarize_segmentation({k: v.sum(0) for k, v in stats.items()})
        return f"mIoU {m['miou']:.1f} % (classes of this image), pixel accuracy {m['acc']:.1f} %"

    def picture(self, sample: dict, pred: torch.Tensor, title: str) -> np.ndarray:
        labels = pred.argmax(0) if pred.ndim == 3 else pred
        return segmentation_picture(
            sample["image"], labels, sample["mask"], self.num_classes, title, self.class_names
        )
