"""Pre-training's configuration schema (backs `configs/pretrain.yaml`) and its validation.

The `model` and `data` groups are pre-training's own; `train`, `optim`, `launcher` and `logger`
are the shared ones of `pixio.runtime.config`. `validate_pretrain` checks every value, and that
the paths exist, before any model or GPU is touched; ConfigError names the first bad key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from pixio.constants import DEFAULT_PATCH_SIZE as PATCH
from pixio.models.masking import num_kept
from pixio.models.registry import list_models
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

# Keys that fix parameter shapes: a resume cannot change them.
SHAPE_KEYS = tuple(
    f"model.{k}"
    for k in ("name", "img_size", "n_cls_tokens", "embed_dim", "depth", "num_heads",
              "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
)  # fmt: skip


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
    mask_ratio: float = 0.75  # share of patch groups masked (at least one group stays visible)
    norm_pix_loss: bool = True  # normalise each target patch by its mean and variance


@dataclass
class DataConfig:
    root: str = MISSING  # shard root (kind=imagenet: *train*.tar; kind=web: **/*.tar)
    kind: str = "imagenet"  # imagenet | web
    json_root: str | None = None  # per-shard curation statistics (kind=web); an existing folder
    hist_thresh: float | None = None  # keep images with histogram_score > this
    imgres_thresh: int | None = None  # keep images whose both sides are >= this
    soft_sampling: bool = False  # keep an image with probability mae_loss
    missing_json: str = "unfiltered"  # shard without statistics: unfiltered | skip
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop scale
    shuffle_buffer: int = 10000  # shuffle buffer of encoded samples, per worker (count bound)
    shuffle_buffer_mb: float = 1024  # ... and its byte bound in MiB per worker (docs/data.md)
    shard_interleave: int = 8  # shards each worker reads at once (round-robin)
    shard_list: str | None = None  # file (from the cwd) of shard paths (relative: to root)
    num_workers: int = 6  # data-loader workers per process
    build_demo: bool = False  # build the demo shards under `root` (absent, empty or a demo)


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
    """Register the schema so Hydra type-checks every composed config."""
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def validate_pretrain(cfg: DictConfig | PretrainConfig) -> None:
    """Check values, then paths, before anything is built; ConfigError names the first bad key."""
    require_set(cfg, "model.name", "data.root", "output_dir")
    validate_common(cfg)
    ipe = cfg.train.iters_per_epoch
    require(ipe is not None, "train.iters_per_epoch", "is required for pre-training (a shard stream has no length)")  # fmt: skip
    _check_model(cfg.model)
    _check_data(cfg.data)
    _check_paths(cfg.data)


def _check_model(m: Any) -> None:
    models = list_models()
    require(m.name in models, "model.name", f"unknown model {m.name!r}; valid: {', '.join(models)}")
    require(m.mask_grid >= 1, "model.mask_grid", f"must be >= 1, got {m.mask_grid}")
    size, unit = m.img_size, PATCH * m.mask_grid
    require(size > 0 and size % PATCH == 0, "model.img_size", f"{size} is not divisible by the patch size {PATCH}")  # fmt: skip
    require(size % unit == 0, "model.img_size", f"{size} is not divisible by {PATCH} * mask_grid = {unit}")  # fmt: skip
    require(0 <= m.mask_ratio < 1, "model.mask_ratio", f"must be in [0, 1), got {m.mask_ratio}")
    groups = (size // unit) ** 2
    require(num_kept(groups, m.mask_ratio) >= 1, "model.mask_ratio", f"{m.mask_ratio} leaves no patch group visible ({groups} groups of {unit}x{unit} px at img_size {size}; raise img_size, or lower mask_grid or mask_ratio)")  # fmt: skip
    require(0 <= m.drop_path < 1, "model.drop_path", f"must be in [0, 1), got {m.drop_path}")


def _check_data(d: Any) -> None:
    check_choice(d, "data", "kind", ("imagenet", "web"))
    check_choice(d, "data", "missing_json", ("unfiltered", "skip"))
    require(bool(d.root), "data.root", "is empty")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    require(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    check_positive(d, "data", "shuffle_buffer_mb", "shard_interleave")
    require(d.shard_list is None or bool(d.shard_list), "data.shard_list", "is empty (use null)")
    require(d.json_root is None or bool(d.json_root), "data.json_root", "is empty (use null)")
    scale = list(d.crop_scale)
    require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "data.crop_scale", f"must be [min, max] with 0 < min <= max <= 1, got {scale}")  # fmt: skip
    _check_filters(d)


def _check_filters(d: Any) -> None:
    """Filters read the statistics of web shards: kind=web and a json_root (the demo's own with
    data.build_demo)."""
    active = d.hist_thresh is not None or d.imgres_thresh is not None or d.soft_sampling
    if d.build_demo:  # web shards with their own statistics (json_root is the demo's)
        require(d.kind == "web", "data.kind", f"must be web with data.build_demo (the demo shards are web tars), got {d.kind!r}")  # fmt: skip
        return
    require(not active or d.kind == "web", "data.kind", f"the filters (hist_thresh, imgres_thresh, soft_sampling) apply to kind web only, not {d.kind!r}")  # fmt: skip
    require(not active or d.json_root is not None, "data.json_root", "is required by the filters (hist_thresh, imgres_thresh, soft_sampling)")  # fmt: skip


def _check_paths(d: Any) -> None:
    """Existence only: a web root at scale holds ~100k tars on shared storage, never globbed here."""
    root = Path(d.root).expanduser()
    if d.build_demo:
        _check_demo_root(root)
    else:
        require(root.is_dir(), "data.root", f"{root} does not exist or is not a directory")
    if d.json_root is not None and not d.build_demo:  # the demo uses its own statistics
        json_root = Path(d.json_root).expanduser()
        require(json_root.is_dir(), "data.json_root", f"{json_root} does not exist or is not a directory")  # fmt: skip
    if d.shard_list is not None:  # read from the working directory, as pixio.data reads it
        shard_list = Path(d.shard_list).expanduser()
        require(shard_list.is_file(), "data.shard_list", f"{shard_list} does not exist or is not a file")  # fmt: skip


def _check_demo_root(root: Path) -> None:
    """The demo is built under an absent or empty root, or rebuilt in a demo's own folder;
    never inside someone else's data (a rebuild replaces `shards/` and `json/` there)."""
    from pixio.data.demo import is_demo_root  # the data stack, only when a demo is asked for

    if not root.exists():
        return
    require(root.is_dir(), "data.root", f"{root} is not a directory (data.build_demo)")
    empty = next(root.iterdir(), None) is None
    require(empty or is_demo_root(root), "data.root", f"{root} holds other data, not a demo set; data.build_demo builds only in an absent, empty or demo folder")  # fmt: skip
