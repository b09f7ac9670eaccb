"""The linear probe's job of `python -m evaluation.linear` (whose docstring gives the recipe;
the config and its checks are `evaluation.linear_config`'s, which loads no torch): the frozen
encoder's pooled feature, one BatchNorm1d + Linear head per base lr (`evaluation.grid`), the
loaders, the trainer's run and results.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from evaluation.encoder_config import ENCODER_FILE, ENCODER_SHAPE_KEYS
from evaluation.features import FrozenFeatures, encoder_digest, load_frozen_encoder
from evaluation.grid import (
    RULE,
    GridHead,
    build_grid,
    head_results,
    metric_key,
    module_specs,
    optimizer_specs,
    reported_head,
)
from evaluation.linear_config import (
    DATASET,
    METRICS,
    TASK,
    check_output_owner,
    resolve_accum,
    validate_linear,
)
from evaluation.linear_data import CentreCrop, LabelledImages, TrainCrop, build_indexes
from evaluation.results import RESULTS_FILE, encoder_record
from evaluation.selection import validation_history
from evaluation.task import share_buffers
from pixio.knn import build_demo_folders, pooled_features
from pixio.models.encoder import PixioEncoder
from pixio.models.features import FeatureEncoder
from pixio.models.flops import ViTSpec, encoder_forward_flops, linear_flops
from pixio.runtime.atomic import write_text_atomic
from pixio.runtime.config import to_container
from pixio.runtime.distributed import DistInfo, barrier
from pixio.runtime.job import run_job
from pixio.runtime.maploader import EvalLoader, MapLoader
from pixio.runtime.parallel import unwrap
from pixio.runtime.prefetch import normalize_batch
from pixio.runtime.rank0 import rank0_result
from pixio.runtime.runconfig import check_resume
from pixio.runtime.task import ModuleSpec, OptimizerSpec, StepOutput, Task, Validation
from pixio.runtime.trainer import Trainer

log = logging.getLogger("pixio.eval")

# A resume cannot change what the heads were trained on, nor the heads themselves.
SHAPE_KEYS = (
    *ENCODER_SHAPE_KEYS,
    "linear.feature", "head.lrs",
)  # fmt: skip


# ---- the task -----------------------------------------------------------------------------------
class PooledFeatures(FrozenFeatures):
    """A frozen encoder (eval mode, no gradients) giving one global feature per image:
    (B, 3, H, W) -> (B, F) float32, F = D (`cls`, `avgpool`) or 2D (`both`), from the last block
    after the final norm (`pixio.knn.pooled_features`)."""

    def __init__(self, encoder: FeatureEncoder, pool: str) -> None:
        super().__init__(encoder, [encoder.depth - 1])
        self.pool = pool
        self.dim = encoder.embed_dim * (2 if pool == "both" else 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return pooled_features(self.encoder, images, self.pool, normed=True)


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """MAE's probe head: BatchNorm1d without affine (eps 1e-6), then Linear (weight trunc-normal
    std 0.01, bias 0); state-dict names `0.*` (the BatchNorm's statistics) and `1.*`."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


class LinearProbeTask(Task):
    """The frozen `encoder` and one trainable head per lr (`head_lr<value>`, each its own LARS):
    one encoder forward per batch, cross-entropy per head. Validation: per head, top-1 / top-5
    hits per image; `top1` / `top5` are those of the best head of that validation."""

    validation = Validation("top1", mode="max")

    def __init__(self, features: PooledFeatures, grid: list[GridHead], num_classes: int) -> None:
        self.features, self.grid, self.num_classes = features, grid, num_classes

    def modules(self) -> dict[str, ModuleSpec]:
        # Replicated (bf16 blocks on GPUs: 10.9 GB at 5B), so validation needs no collective.
        blocks = list(self.features.encoder.blocks)
        encoder = ModuleSpec(self.features, trainable=False, parallel="none", shard_units=blocks)
        return {"encoder": encoder, **module_specs(self.grid)}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return optimizer_specs(self.grid)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch on `device`, its uint8 images normalised there."""
        return normalize_batch(super().to_device(batch, device))

    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        features = modules["encoder"](batch["image"])  # (B, F): once for every head
        losses = {h.name: F.cross_entropy(modules[h.name](features).float(), batch["label"]) for h in self.grid}  # fmt: skip
        # Each head's gradient comes from its own loss only: the sum trains them independently.
        metrics = {f"loss/{n}": v.detach() for n, v in losses.items()} if len(losses) > 1 else {}
        return StepOutput(sum(losses.values()), metrics, losses)

    def validate(self, modules: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        features = modules["encoder"](batch["image"])
        labels = batch["label"][:, None]
        stats = {}
        for h in self.grid:
            head = unwrap(modules[h.name])  # bare: rank 0's BatchNorm statistics, as saved
            share_buffers(head)
            top = head(features).float().topk(min(5, self.num_classes), dim=1).indices  # (B, 5)
            hits = (top == labels).double()
            stats[metric_key(h.name, "top1")] = hits[:, 0]
            stats[metric_key(h.name, "top5")] = hits.sum(1)
        return stats

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per head top-1 / top-5 in percent, and `top1` / `top5` of the best head (the first
        of equal ones): the trainer's best over validations is then the best head's best."""
        n = float(totals["samples"])
        out = {metric_key(h.name, m): 100 * float(totals[metric_key(h.name, m)]) / n for h in self.grid for m in METRICS}  # fmt: skip
        best = max(self.grid, key=lambda h: out[metric_key(h.name, "top1")]).name
        return {**{m: out[metric_key(best, m)] for m in METRICS}, **out, "samples": n}

    def flops_per_sample(self, batch: dict) -> float | None:
        """The encoder's forward and each head's forward and weight gradient (the features need
        none); None for a baseline encoder."""
        encoder = self.features.encoder
        if not isinstance(encoder, PixioEncoder):
            return None
        height, width = batch["image"].shape[-2:]
        head = 2 * linear_flops(1, self.features.dim, self.num_classes)
        return float(encoder_forward_flops(ViTSpec.of(encoder), height, width) + len(self.grid) * head)  # fmt: skip


# ---- building -----------------------------------------------------------------------------------
def build_loaders(cfg: Any, info: DistInfo, protocol: dict[str, Any]) -> tuple[MapLoader, EvalLoader, dict[str, int]]:  # fmt: skip
    """Training crops (shuffled, seeded per sample) and validation centre crops; the index is
    listed once, on rank 0. Also the split sizes and the class count."""
    train_index, val_index, classes = rank0_result(lambda: build_indexes(cfg.data.root))
    d, t = cfg.data, cfg.train
    train = LabelledImages(train_index, TrainCrop(protocol["crop"], tuple(d.crop_scale)))
    val = LabelledImages(val_index, CentreCrop(d.resize, protocol["crop"]))
    pin = info.device.type == "cuda"
    loader = MapLoader(train, t.batch_size, info.rank, info.world_size, d.num_workers, t.seed, pin_memory=pin)  # fmt: skip
    val_loader = EvalLoader(val, t.batch_size, info.rank, info.world_size, d.num_workers)
    sizes = {"n_train": len(train), "n_val": len(val), "num_classes": classes}
    log.info("data: %d training / %d validation images, %d classes", *sizes.values())
    return loader, val_loader, sizes


def build_task(cfg: Any, info: DistInfo, num_classes: int) -> LinearProbeTask:
    """The frozen encoder's pooled features and one head per lr (all from train.seed)."""
    torch.manual_seed(cfg.train.seed)  # a demo's random weights: the same in every run
    encoder = load_frozen_encoder(cfg.encoder, info.device, cfg.train.precision)
    features = PooledFeatures(encoder, cfg.linear.feature)
    grid = build_grid(list(cfg.head.lrs), lambda: linear_head(features.dim, num_classes), cfg.optim, "blr", cfg.train.seed)  # fmt: skip
    return LinearProbeTask(features, grid, num_classes)


# ---- results ------------------------------------------------------------------------------------
def results_record(
    config: dict[str, Any],
    task: LinearProbeTask,
    global_batch: int,
    epochs: list[dict[str, Any]],
    extra: dict[str, Any],  # fmt: skip
) -> dict[str, Any]:
    """results.json: the head-run schema (task `linear`, dataset, demo, head = the feature,
    metric top1, `best` / `final` of the reported head, labelled, every epoch's validation,
    the encoder record), plus `reported_head`, the `rule` that chose it and the `grid`: each
    head's base lr, lr, best and final."""
    names = [h.name for h in task.grid]
    per_head = head_results(epochs, names, METRICS)
    chosen = reported_head(per_head, "top1")
    lr_of = {h.name: h.lr for h in task.grid}
    grid = {n: {"blr": lr_of[n], "lr": lr_of[n] * global_batch / 256, **per_head[n]} for n in names}  # fmt: skip
    enc = config["encoder"]
    return {
        "task": TASK, "dataset": DATASET, "demo": bool(config["data"].get("demo")),
        "head": config["linear"]["feature"], "metric": "top1",
        "best": {"label": "best over epochs", "head": chosen, **per_head[chosen]["best"]},
        "final": {"label": "final epoch", "head": chosen, **per_head[chosen]["final"]},
        "reported_head": chosen, "rule": RULE.format(metric="top-1"), "grid": grid,
        "epochs": epochs, "encoder": encoder_record(enc, enc.get("sha256")),
        "global_batch": global_batch, **extra, "config": config,
    }  # fmt: skip


def results_table(results: dict[str, Any]) -> str:
    """One line per head: its base lr and lr, best top-1 (epoch) and top-5, final top-1; the
    reported head marked."""
    lines = [f"linear probe ({results['head']}) of {results['encoder']['name']}: {results['rule']}",
             f"{'head':>16}  {'blr':>8}  {'lr':>8}  {'best top1':>9}  {'epoch':>5}  {'top5':>6}  {'final':>6}"]  # fmt: skip
    for name, g in results["grid"].items():
        mark = "  <- reported" if name == results["reported_head"] else ""
        b = g["best"]
        lines.append(f"{name:>16}  {g['blr']:>8.3g}  {g['lr']:>8.3g}  {b['top1']:>9.2f}  {b['epoch']:>5.3g}  {b['top5']:>6.2f}  {g['final']['top1']:>6.2f}{mark}")  # fmt: skip
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------
def run_linear(cfg: DictConfig) -> dict[str, Any] | None:
    """Train the probe's heads on the frozen encoder; results.json's content on rank 0 once
    the schedule is complete (None elsewhere, or after a train.max_iters stop)."""
    protocol = validate_linear(cfg)
    cfg.data.crop = protocol["crop"]
    with run_job(cfg.output_dir, cfg.train.device, cfg.train.cpu_threads) as info:
        resolve_accum(cfg, info.world_size)
        config = to_container(cfg)
        config["encoder"]["sha256"] = rank0_result(lambda: encoder_digest(cfg.encoder))
        config["data"]["demo"] = bool(cfg.data.build_demo)  # results.json's `demo`
        check_resume(cfg.output_dir, config, SHAPE_KEYS, None, ENCODER_FILE)
        check_output_owner(cfg, sha256=config["encoder"]["sha256"])
        if cfg.data.build_demo:
            if info.is_main:
                build_demo_folders(cfg.data.root)
            barrier()
        train, val, sizes = build_loaders(cfg, info, protocol)  # data mistakes stop first
        task = build_task(cfg, info, sizes["num_classes"])
        trainer = Trainer(cfg, task, train, info, config, val)
        trainer.fit()
        if info.rank != 0:
            return None
        if trainer.progress.iteration < trainer.total_iters:  # train.max_iters: a partial run
            log.info("stopped at iteration %d of %d (train.max_iters): results.json is written when the schedule completes", trainer.progress.iteration, trainer.total_iters)  # fmt: skip
            return None
        epochs = validation_history(cfg.output_dir, trainer.iters_per_epoch)
        extra = {"protocol": protocol, "architecture": task.features.encoder.describe(), **sizes,
                 "feature_dim": task.features.dim}  # fmt: skip
        results = results_record(config, task, trainer.global_batch, epochs, extra)
        write_text_atomic(Path(cfg.output_dir) / RESULTS_FILE, json.dumps(results, indent=2) + "\n")  # fmt: skip
        print(results_table(results), flush=True)
        return results
