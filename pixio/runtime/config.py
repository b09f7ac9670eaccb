"""Typed configuration schema shared by the Pixio jobs (backs the Hydra groups in `configs/`).

Every field has one line of doc. `validate_pretrain` checks values before any model or GPU is
touched and raises `ConfigError` with one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pixio.models.registry import list_models
from pixio.runtime.launcher import LauncherConfig, launcher_config


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    name: str = MISSING  # registry name, e.g. pixio_vith16 (see pixio.list_models())
    img_size: int = 256  # training crop size; a multiple of patch_size * mask_grid
    drop_path: float = 0.0  # stochastic depth, linear over depth up to this rate
    n_cls_tokens: int = 8  # number of class tokens
    embed_dim: int | None = None  # override the registry width (small demo/test models)
    depth: int | None = None  # override the registry depth
    num_heads: int | None = None  # override the registry head count
    decoder_embed_dim: int = 512  # decoder width
    decoder_depth: int = 32  # decoder blocks
    decoder_num_heads: int = 16  # decoder attention heads
    mask_grid: int = 4  # side of the square patch groups that are masked together
    mask_ratio: float = 0.75  # share of patch groups masked
    norm_pix_loss: bool = True  # normalise each target patch by its mean and variance


@dataclass
class DataConfig:
    root: str = MISSING  # shard root (kind=imagenet: *train*.tar; kind=web: **/*.tar)
    kind: str = "imagenet"  # imagenet | web
    json_root: str | None = None  # per-shard curation statistics (kind=web)
    hist_thresh: float | None = None  # keep images with histogram_score > this
    imgres_thresh: int | None = None  # keep images whose both sides are >= this
    soft_sampling: bool = False  # keep an image with probability mae_loss
    missing_json: str = "unfiltered"  # shard without statistics: unfiltered | skip
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop scale
    shuffle_buffer: int = 10000  # shuffle buffer of encoded samples, per worker (count bound)
    shuffle_buffer_mb: float = 1024  # ... and its byte bound in MiB per worker (docs/data.md)
    shard_interleave: int = 8  # shards each worker reads at once (round-robin)
    shard_list: str | None = None  # text file of shard paths (relative: to root) instead of a glob
    num_workers: int = 6  # data-loader workers per process
    build_demo: bool = False  # build the built-in demo shards under `root` if missing


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute lr; None -> blr * global_batch / 256
    blr: float = 1.5e-4  # base lr per 256 images
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.05  # AdamW weight decay (not on biases / norms / 1-d params)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    warmup_epochs: float = 40.0  # linear warmup length in epochs
    clip_grad: float | None = None  # max grad norm; None = no clipping (norm still logged)
    fused: bool | None = None  # fused AdamW; None = on for CUDA


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per process (per GPU) per iteration
    epochs: int = 400  # schedule length in epochs
    iters_per_epoch: int = 1605  # data iterations per epoch (streams have no natural epoch)
    accum_iter: int = 1  # gradient accumulation: iterations per optimiser step
    save_every_iters: int = 1000  # full checkpoint period (multiple of accum_iter)
    keep_last: int = 2  # newest numbered checkpoints kept (checkpoint-last points at the newest)
    keep_every: int | None = None  # also keep numbered checkpoints at multiples of this
    async_save: bool | None = None  # write checkpoints in the background; None = on with CUDA
    log_every: int = 20  # console/metrics/wandb period in iterations
    vis_every: int = 1000  # reconstruction picture period in iterations (0 = off)
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast dtype; fp16 uses a grad scaler)
    parallel: str = "auto"  # auto | none | ddp | fsdp (auto: fsdp for 1B/5B, ddp otherwise)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in backward
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # global seed (model init, masking, data order)
    max_iters: int | None = None  # stop (with a checkpoint) after this many iterations


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "pixio"  # wandb project
    entity: str | None = None  # wandb entity (team or user)
    run_name: str | None = None  # wandb run name; None = output_dir's name
    mode: str | None = None  # online | offline | disabled; None = offline without an API key
    tags: list[str] = field(default_factory=list)  # wandb tags


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the MAE being pre-trained
    data: DataConfig = field(default_factory=DataConfig)  # shards and filters
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and lr schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # loop, precision, checkpoints
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # local or SLURM
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb
    output_dir: str = MISSING  # checkpoints, metrics.jsonl, vis/, encoder.safetensors


def register_configs() -> None:
    """Register the schemas so Hydra type-checks every composed config."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _is_missing(cfg: DictConfig | PretrainConfig, dotted: str) -> bool:
    """True when `dotted` (e.g. "data.root") is still `???`."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        cfg = getattr(cfg, key)
    if isinstance(cfg, DictConfig):
        return OmegaConf.is_missing(cfg, leaf)
    return getattr(cfg, leaf) == MISSING


def _choice(node: Any, group: str, key: str, options: tuple[str, ...]) -> None:
    value = getattr(node, key)
    _require(
        value in options, f"{group}.{key}", f"must be one of {', '.join(options)}; got {value!r}"
    )


def _positive(node: Any, group: str, *keys: str) -> None:
    for key in keys:
        value = getattr(node, key)
        _require(value > 0, f"{group}.{key}", f"must be positive, got {value}")


def _check_model(m: Any) -> None:
    models = list_models()
    _require(
        m.name in models, "model.name", f"unknown model {m.name!r}; valid: {', '.join(models)}"
    )
    _require(m.mask_grid >= 1, "model.mask_grid", f"must be >= 1, got {m.mask_grid}")
    size, unit = m.img_size, 16 * m.mask_grid
    _require(size > 0 and size % 16 == 0, "model.img_size", f"{size} is not divisible by the patch size 16")  # fmt: skip
    _require(size % unit == 0, "model.img_size", f"{size} is not divisible by 16 * mask_grid = {unit}")  # fmt: skip
    _require(0 <= m.mask_ratio < 1, "model.mask_ratio", f"must be in [0, 1), got {m.mask_ratio}")
    _require(0 <= m.drop_path < 1, "model.drop_path", f"must be in [0, 1), got {m.drop_path}")


def _check_data(d: Any) -> None:
    _choice(d, "data", "kind", ("imagenet", "web"))
    _choice(d, "data", "missing_json", ("unfiltered", "skip"))
    _require(bool(d.root), "data.root", "is empty")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    _positive(d, "data", "shuffle_buffer_mb", "shard_interleave")
    _require(d.shard_list is None or bool(d.shard_list), "data.shard_list", "is empty (use null)")


def _check_train(t: Any, o: Any) -> None:
    _positive(t, "train", "batch_size", "epochs", "iters_per_epoch", "accum_iter")
    _positive(t, "train", "save_every_iters", "log_every", "keep_last")
    every, accum = t.save_every_iters, t.accum_iter
    _require(every % accum == 0, "train.save_every_iters", f"{every} is not a multiple of train.accum_iter = {accum}")  # fmt: skip
    _choice(t, "train", "precision", ("bf16", "fp16", "fp32"))
    _choice(t, "train", "parallel", ("auto", "none", "ddp", "fsdp"))
    _choice(t, "train", "device", ("auto", "cpu", "cuda"))
    _require(o.lr is None or o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _positive(o, "optim", "blr")
    _require(0 <= o.warmup_epochs <= t.epochs, "optim.warmup_epochs", f"must be in [0, train.epochs], got {o.warmup_epochs}")  # fmt: skip


def validate_pretrain(cfg: DictConfig | PretrainConfig) -> None:
    """Check values before anything is built; ConfigError names the first bad key."""
    missing = [k for k in ("model.name", "data.root", "output_dir") if _is_missing(cfg, k)]
    _require(not missing, missing[0] if missing else "", "is required (set it on the command line)")
    _check_model(cfg.model)
    _check_data(cfg.data)
    _check_train(cfg.train, cfg.optim)
    try:
        launcher_config(cfg.launcher)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _choice(cfg.logger, "logger", "name", ("wandb", "none"))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict (what checkpoints and wandb store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
