"""ImageNet linear probe of a frozen encoder, MAE's protocol, on the shared trainer.

    python -m evaluation.linear experiment=linear_imagenet encoder.checkpoint=/ckpt/pixio_vith16.pth
    python -m evaluation.linear experiment=linear_demo       # CPU, about a minute

Recipe (MAE's linear probe; docs/evaluation.md, "Linear probe"): frozen encoder; head =
BatchNorm1d(D, affine=False, eps=1e-6) + Linear(D, classes) (weight trunc-normal std 0.01, bias
0) on the global feature (`linear.feature`: `cls`, the mean of the class tokens of the last
block after the final norm; `avgpool`, the mean of its final-normed patch tokens; `both`, the
two concatenated); LARS (momentum 0.9, trust coefficient 1e-3, weight decay 0), lr = blr x
global batch / 256 with blr 0.1 and a global batch of 16384 (`linear.global_batch` sets
`train.accum_iter`), 90 epochs, 10 of linear warmup, then cosine; RandomResizedCrop(256,
bicubic, area 0.08-1) + flip for training, resize 256 + centre crop 256 for validation (Pixio's
256 px input; MAE's is 224).

`head.lrs` trains one head per base lr on the same features in one run (`evaluation.grid`):
the encoder runs once per batch, every head gets its features and has its own LARS and
schedule. Every `train.val_every` epochs each head's top-1 / top-5 is validated; results.json
(the schema of the other evaluations) reports the head with the best top-1 over epochs, its
best and final validation, and every head's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from torch import nn

from evaluation.common import resolve_encoder_name, validation_history
from evaluation.features import (
    EncoderConfig,
    FrozenFeatures,
    check_encoder,
    check_random_weights,
    encoder_digest,
    load_frozen_encoder,
    reference_side,
)
from evaluation.grid import (
    RULE,
    GridHead,
    build_grid,
    check_lrs,
    head_results,
    metric_key,
    module_specs,
    optimizer_specs,
    reported_head,
)
from evaluation.linear_data import CentreCrop, LabelledImages, TrainCrop, build_indexes
from evaluation.report import linear_owner_problem
from evaluation.results import RESULTS_FILE, app_identity, encoder_record
from evaluation.task import share_buffers
from pixio.knn import POOLS, build_demo_folders, pooled_features
from pixio.models.encoder import PixioEncoder
from pixio.models.features import FeatureEncoder
from pixio.models.flops import ViTSpec, encoder_forward_flops, linear_flops
from pixio.runtime.atomic import write_text_atomic
from pixio.runtime.config import (
    LauncherConfig,
    LoggerConfig,
    OptimConfig,
    TrainConfig,
    check_choice,
    check_positive,
    require,
    require_set,
    to_container,
    validate_common,
)
from pixio.runtime.distributed import DistInfo, barrier
from pixio.runtime.job import run_job
from pixio.runtime.launcher import validate_and_launch
from pixio.runtime.maploader import EvalLoader, MapLoader
from pixio.runtime.parallel import unwrap
from pixio.runtime.paths import PathsConfig, check_path_refs
from pixio.runtime.prefetch import normalize_batch
from pixio.runtime.rank0 import rank0_result
from pixio.runtime.runconfig import check_resume
from pixio.runtime.task import ModuleSpec, OptimizerSpec, StepOutput, Task, Validation
from pixio.runtime.trainer import Trainer

log = logging.getLogger("pixio.eval")

TASK, DATASET, METRICS = "linear", "imagenet", ("top1", "top5")
# A resume cannot change what the heads were trained on, nor the heads themselves.
SHAPE_KEYS = (
    "encoder.source", "encoder.name", "encoder.module", "encoder.model_kwargs",
    "encoder.embed_dim", "encoder.depth", "encoder.num_heads", "encoder.n_cls_tokens",
    "linear.feature", "head.lrs",
)  # fmt: skip
ENCODER_FILE = {"encoder.sha256": "encoder.checkpoint"}  # same file (digest) on resume
REFERENCE = {"resize": 256, "crop": 256, "crop_scale": [0.08, 1.0]}  # Pixio's 256 px input


# ---- schema -------------------------------------------------------------------------------------
@dataclass
class LinearDataConfig:
    # train/ and val/ (class folders, or .tar shards with .cls labels), or *train*.tar and
    # *val*.tar shards (pre-training's layout); default: paths.imagenet_folders
    root: str = MISSING
    num_workers: int = 10  # data-loader processes per rank (training and validation)
    resize: int = 256  # validation: short side after the bicubic resize
    crop: int | None = None  # training crop and validation centre crop (None: 256; patch 14: 252)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area
    build_demo: bool = False  # build the demo ImageFolder at root first (experiment=linear_demo)


@dataclass
class LinearProbeConfig:
    feature: str = "cls"  # cls (mean class token) | avgpool (mean patch token) | both (concat)
    # samples per optimiser step: train.accum_iter = global_batch / (batch_size x processes);
    # null: train.accum_iter as given
    global_batch: int | None = 16384


@dataclass
class LinearHeadConfig:
    lrs: list[float] = field(default_factory=lambda: [0.1])  # base lrs, one head each (x batch/256)


@dataclass
class LinearAppConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)  # this machine's dataset roots
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen encoder
    data: LinearDataConfig = field(default_factory=LinearDataConfig)  # the images
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)  # feature, global batch
    head: LinearHeadConfig = field(default_factory=LinearHeadConfig)  # the lr grid
    optim: OptimConfig = field(default_factory=OptimConfig)  # LARS, schedule (lr: head.lrs)
    train: TrainConfig = field(default_factory=TrainConfig)  # loop, precision, checkpoints
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # local or SLURM
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb
    output_dir: str = MISSING  # checkpoints, metrics.jsonl, results.json


def register_configs() -> None:
    """Register the schema so Hydra type-checks the composed config."""
    ConfigStore.instance().store(name="eval_linear_schema", node=LinearAppConfig)


# ---- validation ---------------------------------------------------------------------------------
def validate_linear(cfg: Any) -> dict[str, Any]:
    """Check values and paths before anything is built; ConfigError names the first bad key.
    Returns the protocol record (sizes used beside the reference's)."""
    check_path_refs(cfg, "data.root")  # unset paths.imagenet_folders: name the key to set
    require_set(cfg, "data.root", "output_dir")
    resolve_encoder_name(cfg)
    validate_common(cfg)
    patch = check_encoder(cfg)
    check_choice(cfg.linear, "linear", "feature", POOLS)
    check_positive(cfg.linear, "linear", "global_batch", optional=True)
    check_lrs(cfg.head.lrs, "head.lrs")
    require(cfg.optim.lr is None, "optim.lr", "the lrs are head.lrs (base lrs per 256 images): leave optim.lr null")  # fmt: skip
    require(cfg.train.iters_per_epoch is None, "train.iters_per_epoch", "must stay null (an epoch is the training split)")  # fmt: skip
    used = _check_data(cfg.data, patch)
    check_random_weights(cfg)
    check_output_owner(cfg)
    return {"patch_size": patch, **used, "reference": REFERENCE, "as_reference": used == REFERENCE}


def _check_data(d: Any, patch: int) -> dict[str, Any]:
    """The `data` group; returns the sizes used (resize, crop, crop_scale)."""
    check_positive(d, "data", "resize")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    scale = list(d.crop_scale)
    require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "data.crop_scale", f"must be [min, max] with 0 < min <= max <= 1, got {scale}")  # fmt: skip
    require(d.crop is None or (d.crop > 0 and d.crop % patch == 0), "data.crop", f"{d.crop} is not a positive multiple of the encoder's patch size {patch} (null picks {reference_side(patch)})")  # fmt: skip
    if not d.build_demo:
        require(Path(d.root).is_dir(), "data.root", f"{d.root} does not exist or is not a directory")  # fmt: skip
    return {"resize": d.resize, "crop": d.crop or reference_side(patch), "crop_scale": scale}


def check_output_owner(cfg: Any, **digest: str | None) -> None:
    """ConfigError unless output_dir is free for this probe's results.json: none there, or a
    linear probe's of the same feature and encoder (with `sha256=`, the same checkpoint)."""
    identity = app_identity(TASK, cfg.encoder, DATASET, cfg.linear.feature, **digest)
    problem = linear_owner_problem(cfg.output_dir, identity)
    require(problem is None, "output_dir", str(problem))


def resolve_accum(cfg: Any, world_size: int) -> None:
    """`train.accum_iter` from `linear.global_batch` (ConfigError unless it divides exactly
    into batch_size x processes micro-batches, or an explicit accum_iter disagrees)."""
    t, wanted = cfg.train, cfg.linear.global_batch
    if wanted is None:
        return
    per_step = t.batch_size * world_size
    require(wanted % per_step == 0, "linear.global_batch", f"{wanted} is not a multiple of train.batch_size x processes = {t.batch_size} x {world_size}")  # fmt: skip
    accum = wanted // per_step
    require(t.accum_iter in (1, accum), "train.accum_iter", f"is {t.accum_iter}, but linear.global_batch={wanted} needs {accum} on {world_size} process(es): set one of them (linear.global_batch=null keeps train.accum_iter)")  # fmt: skip
    require(t.save_every_iters % accum == 0, "train.save_every_iters", f"{t.save_every_iters} is not a multiple of train.accum_iter = {accum} (from linear.global_batch)")  # fmt: skip
    t.accum_iter = accum
    log.info("global batch %d = %d per process x %d process(es) x train.accum_iter %d", wanted, t.batch_size, world_size, accum)  # fmt: skip


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
    with run_job(cfg.output_dir, cfg.train.device) as info:
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


def main(cfg: DictConfig) -> None:
    """The linear probe of one frozen encoder."""
    run_linear(cfg)


register_configs()
# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="eval_linear", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, then run `main` through the configured launcher."""
    validate_and_launch(main, cfg, validate_linear)


if __name__ == "__main__":
    cli()
