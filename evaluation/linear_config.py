"""The linear probe's config (`configs/eval_linear.yaml`: `LinearAppConfig`) and its checks, in
a module that loads no torch: `python -m evaluation.linear --help`, `--cfg job` and a config
error return before any model library is imported. The recipe is described in
`evaluation.linear`; the job is `evaluation.linear_job`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from evaluation.choices import check_lrs
from evaluation.encoder_config import (
    EncoderConfig,
    check_encoder,
    check_random_weights,
    check_side,
    reference_side,
    resolve_encoder_name,
)
from evaluation.results import app_identity, owner_problem
from pixio.runtime.choices import FEATURE_POOLS
from pixio.runtime.config import (
    LauncherConfig,
    LoggerConfig,
    OptimConfig,
    TrainConfig,
    check_choice,
    check_positive,
    require,
    require_set,
    validate_common,
)
from pixio.runtime.paths import PathsConfig, check_path_refs

log = logging.getLogger("pixio.eval")

TASK, DATASET, METRICS = "linear", "imagenet", ("top1", "top5")
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
    Returns the protocol record (sizes used beside the reference's). The checks that load torch
    come after the values and paths."""
    d = cfg.data
    check_path_refs(cfg, "data.root")  # unset paths.imagenet_folders: name the key to set
    require_set(cfg, "data.root", "output_dir")
    resolve_encoder_name(cfg)
    validate_common(cfg)
    check_positive(cfg.linear, "linear", "global_batch", optional=True)
    check_choice(cfg.linear, "linear", "feature", FEATURE_POOLS)
    check_lrs(cfg.head.lrs, "head.lrs")
    require(cfg.optim.lr is None, "optim.lr", "the lrs are head.lrs (base lrs per 256 images): leave optim.lr null")  # fmt: skip
    require(cfg.train.iters_per_epoch is None, "train.iters_per_epoch", "must stay null (an epoch is the training split)")  # fmt: skip
    _check_data(d)
    # After the values and paths, as it loads torch: the checkpoint's recorded architecture.
    patch = check_encoder(cfg)
    check_side(d.crop, "data.crop", patch)
    check_random_weights(cfg)
    check_output_owner(cfg)
    used = {"resize": d.resize, "crop": d.crop or reference_side(patch), "crop_scale": list(d.crop_scale)}  # fmt: skip
    return {"patch_size": patch, **used, "reference": REFERENCE, "as_reference": used == REFERENCE}


def _check_data(d: Any) -> None:
    """The `data` group but its crop (a multiple of the encoder's patch)."""
    check_positive(d, "data", "resize")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    scale = list(d.crop_scale)
    require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "data.crop_scale", f"must be [min, max] with 0 < min <= max <= 1, got {scale}")  # fmt: skip
    if not d.build_demo:
        require(Path(d.root).is_dir(), "data.root", f"{d.root} does not exist or is not a directory")  # fmt: skip


def check_output_owner(cfg: Any, **digest: str | None) -> None:
    """ConfigError unless output_dir is free for this probe's results.json: none there, or a
    linear probe's of the same feature and encoder (with `sha256=`, the same checkpoint)."""
    identity = app_identity(TASK, cfg.encoder, DATASET, cfg.linear.feature, **digest)
    problem = owner_problem(cfg.output_dir, identity)
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
