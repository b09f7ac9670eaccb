"""The k-NN app's config (`configs/eval_knn.yaml`: `KnnAppConfig`) and its checks, in a module
that loads no torch: `python -m evaluation.knn --help`, `--cfg job` and a config error return
before any model library is imported. The protocol is described in `evaluation.knn`; the job
is `evaluation.knn_job`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from evaluation.encoder_config import (
    EncoderConfig,
    check_encoder,
    check_random_weights,
    check_side,
    resolve_encoder_name,
)
from evaluation.results import app_identity, owner_problem
from pixio.runtime.config import (
    LauncherConfig,
    LoggerConfig,
    check_choice,
    check_cpu_threads,
    check_launcher,
    check_logger,
    check_positive,
    require,
    require_set,
)
from pixio.runtime.paths import PathsConfig, check_path_refs


# ---- configuration ----------------------------------------------------------------------------
@dataclass
class KnnDataConfig:
    root: str = MISSING  # train/<class>/*, val/<class>/* (default: paths.imagenet_folders)
    num_workers: int = 8  # data-loader processes per rank
    resize: int = 256  # short side after the bicubic resize
    crop: int | None = None  # center crop (None: 256; patch 14: 252, a multiple of the patch)
    build_demo: bool = False  # build the small demo folder at `root` first (experiment=knn_demo)


@dataclass
class KnnConfig:
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # neighbour counts
    temperature: float = 0.07  # votes weighted by exp(similarity / temperature)
    chunk_size: int = 128  # test images per similarity chunk (chunk x N_train floats)
    save_features: bool = (
        False  # also write features.pt (features, labels, classes) to re-run k / T
    )


@dataclass
class KnnRunConfig:
    batch_size: int = 64  # images per process per forward
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 | fp32: autocast of the encoder on CUDA (CPU runs fp32)
    cpu_threads: str = "auto"  # torch CPU threads per process: N | auto (its cores / local ranks)


@dataclass
class KnnAppConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)  # this machine's dataset roots
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen encoder
    data: KnnDataConfig = field(default_factory=KnnDataConfig)  # the image folders
    knn: KnnConfig = field(default_factory=KnnConfig)  # k, temperature
    train: KnnRunConfig = field(default_factory=KnnRunConfig)  # batch, device, precision, threads
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # local or SLURM
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb
    output_dir: str = MISSING  # results.json, train.log


def register_configs() -> None:
    """Register the schema so Hydra type-checks the composed config."""
    ConfigStore.instance().store(name="eval_knn_schema", node=KnnAppConfig)


def validate_knn(cfg: Any) -> None:
    """Check values and paths before anything is built; ConfigError names the first bad key.
    The encoder comes after the values and paths: a checkpoint's or a baseline's check loads
    torch."""
    check_path_refs(cfg, "data.root")  # unset paths.imagenet_folders: name the key to set
    require_set(cfg, "data.root", "output_dir")
    require(bool(cfg.output_dir), "output_dir", "is empty")
    resolve_encoder_name(cfg)  # a transformers folder without encoder.name: its model_type
    require(len(cfg.knn.k) > 0 and all(k >= 1 for k in cfg.knn.k), "knn.k", f"must be a non-empty list of positive integers, got {list(cfg.knn.k)}")  # fmt: skip
    check_positive(cfg.knn, "knn", "temperature", "chunk_size")
    check_positive(cfg.train, "train", "batch_size")
    check_positive(cfg.data, "data", "resize")
    require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    check_choice(cfg.train, "train", "device", ("auto", "cpu", "cuda"))
    check_choice(cfg.train, "train", "precision", ("bf16", "fp32"))
    check_cpu_threads(cfg.train.cpu_threads)
    check_launcher(cfg.launcher)
    check_logger(cfg.logger)
    if not cfg.data.build_demo:
        for split in ("train", "val"):
            folder = Path(cfg.data.root) / split
            require(folder.is_dir(), "data.root", f"{folder} is not a directory (expected train/ and val/ class folders)")  # fmt: skip
    patch = check_encoder(cfg)  # after the values: a checkpoint's architecture is read with torch
    check_side(cfg.data.crop, "data.crop", patch)
    check_random_weights(cfg)
    check_output_owner(cfg)


def check_output_owner(cfg: Any, **digest: str | None) -> None:
    """ConfigError unless output_dir is free for this k-NN's results.json: no results there,
    or those of a k-NN of the same encoder (with `sha256=`, the same checkpoint file)."""
    problem = owner_problem(cfg.output_dir, app_identity("knn", cfg.encoder, **digest))
    require(problem is None, "output_dir", str(problem))
