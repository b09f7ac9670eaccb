"""The frozen-encoder head tasks handed to the shared trainer: depth (SiLog on sigmoid * max_depth,
or on the bins' weighted sum of centres) and semantic segmentation (cross-entropy, ignore 255).

Modules: `encoder` (`FrozenFeatures`, frozen: eval mode, no gradients, bf16 on GPUs, only the
blocks the heads read) and the trainable heads, each with its own AdamW, schedule and scaler:
`head` for one lr (the reference), `head_lr<value>` per lr of a grid (`head.lrs`,
`evaluation.grid`). The encoder runs once per batch, and once per window batch in validation,
whatever the number of heads: every head gets the same features. Validation runs the full
image through batched sliding windows (the protocol; test-time augmentation `eval.tta`) and
returns per-image statistics that the trainer sums over real samples and ranks: each image
counts once however the set is split. With several heads each statistic and metric is the
head's (`<head>/<metric>`), and the plain metrics are those of the best head of that
validation. The first `vis_images` validation images are drawn at every validation
(`vis/val_<index>.png`, `val_<index>_<head>.png` for a grid; the latest validation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from evaluation.choices import TTA_SCALES
from evaluation.features import FrozenFeatures
from evaluation.grid import GridHead, metric_key, reported_head
from evaluation.heads import DEPTH_BINS, DPTHead, bin_centres, bins_to_depth, upsample
from evaluation.inference import predict_with_tta, sliding_window, tta_passes
from evaluation.metrics import (
    MIN_VALID_PIXELS,
    class_table,
    depth_bin_edges,
    depth_bin_sums,
    depth_bin_table,
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
    tta: str = "none"  # none | flip | multiscale (evaluation.inference.tta_passes)
    tta_scales: Sequence[float] = field(default_factory=lambda: TTA_SCALES)


def as_grid(head: nn.Module | Sequence[GridHead], optim: Any) -> list[GridHead]:
    """The task's heads: a grid as given, or one head (module `head`, as before grids: its
    checkpoint section and the reference's state-dict names) trained with `optim`."""
    if isinstance(head, nn.Module):
        lr = getattr(optim, "lr", None) if optim is not None else None
        return [GridHead("head", float("nan") if lr is None else float(lr), head, optim)]
    return list(head)


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
        head: nn.Module | Sequence[GridHead],
        optim: Any,
        windows: Windows,
        vis_dir: str | Path | None = None,
        vis_images: int = 0,
        val_source: str = "the validation split",
    ) -> None:
        self.features, self.windows = features, windows
        self.grid = as_grid(head, optim)  # the heads, in the order of their lrs
        self.active = [h.name for h in self.grid]  # the heads validate() measures
        self.tables: dict[
            str, Any
        ] = {}  # the last validation's per-class / per-bin tables, by head
        self.best_head: str | None = None  # the best head of the last validation
        # Called with the metrics after each summary (evaluation.selection's records).
        self.after_summary: Callable[[dict[str, float]], None] | None = None
        self.vis_dir = None if vis_dir is None else Path(vis_dir)
        self.vis_images = vis_images
        self.val_source = val_source  # names the split in errors, e.g. "kitti val split (<list>)"
        # Training iterations done when the head was last stepped (the batches' `iteration`,
        # common.IterationLoader); the pictures' titles say it (None: none in this process).
        self.steps_done: int | None = None

    @property
    def head(self) -> nn.Module:
        """The first head (the only one without a grid)."""
        return self.grid[0].module

    def grid_module(self, name: str) -> nn.Module:
        """The head of module name `name`."""
        return next(h.module for h in self.grid if h.name == name)

    def key(self, head: str, name: str) -> str:
        """A head's statistic or metric: plain while one head is measured, else `<head>/<name>`."""
        return name if len(self.active) == 1 else metric_key(head, name)

    def modules(self) -> dict[str, ModuleSpec]:
        # Replicated, never sharded: validation ranks run different window counts, and an FSDP
        # module needs every rank in every forward.
        blocks = list(self.features.encoder.blocks)  # bf16 weights on GPUs (the root stays fp32)
        encoder = ModuleSpec(self.features, trainable=False, parallel="none", shard_units=blocks)
        return {"encoder": encoder, **{h.name: ModuleSpec(h.module) for h in self.grid}}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {h.name: OptimizerSpec((h.name,), h.optim) for h in self.grid}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch on `device`, its uint8 images normalised there (pixio.runtime.prefetch)."""
        return normalize_batch(super().to_device(batch, device))

    @staticmethod
    def logits(encoder: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Head output (B, C, H, W) at the input size; the encoder keeps no activations."""
        with torch.no_grad():
            features = encoder(images)
        return head(features, tuple(images.shape[-2:]))

    def head_output(self, head: nn.Module, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:  # fmt: skip
        """What `window_output` and `loss` take from a head at `size`: its logits."""
        return head(features, size)

    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        images = batch["image"]
        with torch.no_grad():
            features = modules["encoder"](images)  # once for every head
        if "iteration" in batch:
            self.steps_done = int(batch["iteration"][0]) + 1
        size = tuple(images.shape[-2:])
        losses = {h.name: self.loss(self.head_output(modules[h.name], features, size).float(), batch) for h in self.grid}  # fmt: skip
        if len(losses) == 1:
            return StepOutput(losses[self.grid[0].name])
        # Each head's gradient comes from its own loss alone: the sum trains them independently.
        metrics = {f"loss/{name}": loss.detach() for name, loss in losses.items()}
        return StepOutput(sum(losses.values()), metrics, losses)

    def validate(self, modules: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        """Per image (validation images differ in size): full-image prediction of every active
        head from one encoder pass per window batch, then each head's statistics."""
        # The bare heads (torch.compile and DDP removed): ranks run different numbers of
        # windows, and DDP's forward may broadcast buffers (a collective) on each call.
        encoder = modules["encoder"]
        heads = [(name, unwrap(modules[name])) for name in self.active]
        for _, head in heads:
            share_buffers(head)

        def predict(windows: torch.Tensor) -> torch.Tensor:  # (N, 3, w, w) -> (N, K * C, w, w)
            with torch.no_grad():
                features = encoder(windows)
            size = tuple(windows.shape[-2:])
            return torch.cat([self.window_output(self.head_output(head, features, size).float()) for _, head in heads], dim=1)  # fmt: skip

        rows = []
        for i in range(batch["image"].shape[0]):
            sample = {k: v[i] for k, v in batch.items()}
            pred = self.predict_image(predict, sample["image"])  # (K * C, H, W)
            row: dict[str, torch.Tensor] = {}
            for (name, _), head_pred in zip(heads, pred.split(self.pred_channels), strict=True):
                stats = self.image_stats(head_pred, sample)
                row |= {self.key(name, k): v for k, v in stats.items()}
                self._maybe_draw(sample, head_pred, stats, name)
            rows.append(row)
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def predict_image(self, predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """(C, H, W) prediction of a normalised image (3, H, W) by sliding windows, averaged over
        the test-time augmentation's passes (`eval.tta`; none: the reference path)."""
        w = self.windows

        def windows_pass(x: torch.Tensor, reduce: str) -> torch.Tensor:
            return sliding_window(predict, x, w.window, w.stride, w.window_batch, reduce)

        return predict_with_tta(windows_pass, image, tta_passes(w.tta, w.tta_scales), self.reduce)

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each active head's metrics (`head_metrics`) and tables (`self.tables`); with several
        heads, `<head>/<metric>` for every head and the plain metrics of this validation's best
        head by the ranking metric (the first in lr order of equal ones), so the trainer's best
        over validations is the best over heads and epochs."""
        samples = float(totals["samples"])
        per_head, self.tables = {}, {}
        for name in self.active:
            stats = {k: totals[self.key(name, k)] for k in self.stat_names(totals, name)}
            per_head[name] = self.head_metrics(stats, samples)
            self.tables[name] = self.table(stats)
        metric = self.validation.metric
        self.best_head = reported_head({n: {"best": m} for n, m in per_head.items()}, metric)
        out = dict(per_head[self.best_head])
        if len(self.active) > 1:
            out |= {metric_key(n, k): v for n, m in per_head.items() for k, v in m.items()}
        out["samples"] = samples
        if self.after_summary is not None:
            self.after_summary(out)
        return out

    def stat_names(self, totals: dict[str, torch.Tensor], head: str) -> list[str]:
        """The names of one head's statistics among `totals`' keys."""
        if len(self.active) == 1:
            return [k for k in totals if k != "samples"]
        prefix = metric_key(head, "")
        return [k[len(prefix) :] for k in totals if k.startswith(prefix)]

    def _maybe_draw(self, sample: dict, pred: torch.Tensor, stats: dict[str, torch.Tensor], head: str) -> None:  # fmt: skip
        index = int(sample["index"])
        if self.vis_dir is not None and index < self.vis_images:
            name = f"val_{index}.png" if len(self.active) == 1 else f"val_{index}_{head}.png"
            which = "" if len(self.active) == 1 else f" ({head})"
            title = f"validation image {index}{which}, {self._step_text()}: {self.metric_text(stats)}"  # fmt: skip
            save_png(self.picture(sample, pred, title), self.vis_dir / name)

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
        return float(flops.encoder + len(self.grid) * flops.head_train)  # one encoder pass

    @torch.no_grad()
    def pictures(self, modules: dict[str, nn.Module], batch: dict) -> dict[str, np.ndarray]:
        """The first training crop of the batch: input, prediction, ground truth, titled with
        the step and the crop's metric. Every rank runs the forward (the wrapped head may need
        all ranks); only rank 0, whose pictures the trainer writes, renders."""
        image = batch["image"][:1]
        with torch.no_grad():
            features = modules["encoder"](image)
        head = modules[self.grid[0].name]  # the first head (a grid's: its first lr)
        out = self.window_output(self.head_output(head, features, tuple(image.shape[-2:])).float())
        if not is_main():
            return {}
        sample = {k: v[0] for k, v in batch.items()}
        steps = int(sample["iteration"]) + 1 if "iteration" in sample else None
        metric = self.metric_text(self.image_stats(out[0], sample))
        title = f"training crop, {self._step_text(steps)}: {metric}"
        return {"train_crop": self.picture(sample, out[0], title)}

    # ---- what a subclass says ------------------------------------------------------------
    out_channels = (
        1  # the head's output channels (depth: 1, or the bins; segmentation: the classes)
    )
    pred_channels = 1  # channels of one head's prediction (depth: 1; segmentation: the classes)

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def head_metrics(self, stats: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        """One head's metrics from its summed statistics over `samples` images."""
        raise NotImplementedError

    def table(self, stats: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One head's table (per class, per depth bin) from its summed statistics."""
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
    """Monocular depth: prediction = sigmoid(head) * max_depth (`depth_output="regression"`, the
    reference), or the bin centres weighted by the head's normalised bin logits (`"bins"`, 256
    bins evenly spaced from min_depth to max_depth; the depth is formed at the head's own
    resolution, then upsampled bilinearly, as DINOv2's bins head); SiLog loss (lambda 0.5) on the
    prediction clamped at min_depth; validation metrics averaged over images (d1 ranks), and
    per ground-truth-depth bin (`tables`)."""

    validation = Validation("d1", mode="max")
    reduce = "mean"

    def __init__(
        self,
        *args: Any,
        min_depth: float,
        max_depth: float,
        depth_output: str = "regression",
        bins_norm: str = "linear",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.min_depth, self.max_depth = min_depth, max_depth
        self.depth_output, self.bins_norm = depth_output, bins_norm
        self.centres = bin_centres(min_depth, max_depth) if depth_output == "bins" else None
        self.out_channels = DEPTH_BINS if depth_output == "bins" else 1
        self.bin_edges = depth_bin_edges(max_depth)  # of the per-bin table

    def head_output(self, head: nn.Module, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:  # fmt: skip
        """Logits at `size` (regression); the bins' depth (B, 1, *size) in metres."""
        if self.centres is None:
            return head(features, size)
        logits = head(features, None).float()  # (B, bins, h, w) at the head's own resolution
        return upsample(bins_to_depth(logits, self.centres.to(logits.device), self.bins_norm), size)  # fmt: skip

    def window_output(self, logits: torch.Tensor) -> torch.Tensor:
        if self.centres is not None:
            return logits  # the bins' depth already
        return torch.sigmoid(logits) * self.max_depth

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        pred = self.window_output(out).clamp_min(self.min_depth)
        target = batch["depth"].float()
        valid = depth_valid_mask(target, self.min_depth, self.max_depth)
        return silog_loss(pred, target, valid)

    def image_stats(self, pred: torch.Tensor, sample: dict) -> dict[str, torch.Tensor]:
        target = sample["depth"].float()
        args = (pred[None], target[None])
        bins = depth_bin_sums(*args, self.bin_edges, self.min_depth, self.max_depth)
        return depth_metric_sums(*args, self.min_depth, self.max_depth) | bins

    def head_metrics(self, stats: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        """Per-image means; DataError when no image has a valid target (every metric would be
        NaN, and so would the best result)."""
        if not float(stats["count"]):
            raise DataError(
                f"{self.val_source}: none of its {int(samples)} images has "
                f"{MIN_VALID_PIXELS} or more valid depth pixels (in [{self.min_depth}, "
                f"{self.max_depth}] m): its depth pngs are empty or in another unit; check them "
                "with python -m evaluation.prepare DATASET ROOT --verify"
            )
        return summarize_depth(stats)

    def table(self, stats: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        # Statistics summed from `validate` hold the bins; hand-made totals may not.
        return depth_bin_table(stats, self.bin_edges) if "bin_pixels" in stats else []

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
        self.out_channels = self.pred_channels = num_classes

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

    def head_metrics(self, stats: dict[str, torch.Tensor], samples: float) -> dict[str, float]:
        """mIoU over the set; DataError when no pixel of any mask is labelled (mIoU is NaN)."""
        if not float(stats["target_area"].sum()):
            raise DataError(
                f"{self.val_source}: every pixel of its {int(samples)} masks is "
                f"{IGNORE_INDEX} (ignored) once read: the masks are empty or data.label_format "
                "does not match them; check them with python -m evaluation.prepare DATASET ROOT "
                "--verify"
            )
        return summarize_segmentation(stats)

    def table(self, stats: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        return class_table(stats, self.class_names)

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
