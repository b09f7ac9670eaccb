"""Pre-training's configuration schema (backs `configs/pretrain.yaml`) and its validation.

The `model` group is pre-training's own; `data` is the shared shard stream of `pixio.data.config`
(distillation reads the same data), `train`, `optim`, `launcher` and `logger` the shared groups
of `pixio.runtime.config`, `paths` the machine's dataset roots (`pixio.runtime.paths`: `data.root`
and the monitor's `knn_root` default to them). `validate_pretrain` checks every value, and that
the paths exist, before any model or GPU is touched; ConfigError names the first bad key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from pixio.constants import DEFAULT_PATCH_SIZE as PATCH
from pixio.data.config import DataConfig, check_data
from pixio.models.mask_counts import num_kept
from pixio.models.registry import build_mae, list_models
from pixio.monitor_config import MonitorConfig, check_monitor
from pixio.runtime.config import (
    ConfigError,
    LauncherConfig,
    LoggerConfig,
    OptimConfig,
    TrainConfig,
    require,
    require_set,
    validate_common,
)
from pixio.runtime.paths import PathsConfig, check_path_refs

if TYPE_CHECKING:  # torch loads after validation (docs/performance.md, "Fast command lines")
    from pixio.models.mae import PixioMAE

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
class PretrainTrainConfig(TrainConfig):
    # a fresh run's initial MAE weights (not the optimiser, not the step): a full file of
    # `python -m pixio.convert --full` or a pre-training checkpoint dir; ignored on resume
    init_from: str | None = None


@dataclass
class PretrainConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)  # this machine's dataset roots
    model: ModelConfig = field(default_factory=ModelConfig)  # the MAE being pre-trained
    data: DataConfig = field(default_factory=DataConfig)  # shards and filters
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and lr schedule
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)  # loop, checkpoints
    monitor: MonitorConfig = field(
        default_factory=MonitorConfig
    )  # online k-NN (off: knn_root null)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # local or SLURM
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb
    output_dir: str = MISSING  # checkpoints, metrics.jsonl, vis/, encoder.safetensors


def register_configs() -> None:
    """Register the schema so Hydra type-checks every composed config."""
    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)


def validate_pretrain(cfg: DictConfig | PretrainConfig) -> None:
    """Check values, then paths, before anything is built; ConfigError names the first bad key."""
    check_path_refs(cfg, "data.root", "monitor.knn_root")  # an unset paths.<name>: the key to set
    require_set(cfg, "model.name", "data.root", "output_dir")
    validate_common(cfg)
    ipe = cfg.train.iters_per_epoch
    require(ipe is not None, "train.iters_per_epoch", "is required for pre-training (a shard stream has no length)")  # fmt: skip
    _check_model(cfg.model)
    check_monitor(cfg.monitor, PATCH)
    check_data(cfg.data)
    check_init_from(cfg)


def build_model(cfg: Any) -> PixioMAE:
    """The Pixio MAE named by `model.*` (size overrides only where set)."""
    m = cfg.model
    sizes = {k: m[k] for k in ("embed_dim", "depth", "num_heads") if m[k] is not None}
    return build_mae(
        m.name, img_size=m.img_size, drop_path=m.drop_path, n_cls_tokens=m.n_cls_tokens,
        decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads, mask_grid=m.mask_grid,
        norm_pix_loss=m.norm_pix_loss, **sizes,
    )  # fmt: skip


def check_init_from(cfg: Any) -> None:
    """`train.init_from` exists and, where it records its architecture (a full file, a
    pre-training checkpoint dir), is a full MAE of `model.*`'s sizes: ConfigError naming the
    differing sizes otherwise. The tensors themselves are checked when they are loaded."""
    path = cfg.train.init_from
    if path is None:
        return
    require(Path(path).exists(), "train.init_from", f"not found: {path}")
    import torch

    from pixio.architecture import compare, describe, model_architecture
    from pixio.checkpoint import read_architecture

    try:
        arch = read_architecture(path, "mae")
        if arch is None:
            return
        require(arch["kind"] == "mae", "train.init_from", f"{path} holds an encoder only ({describe(arch)}): it needs the decoder too (python -m pixio.convert --full, or a pre-training checkpoint dir)")  # fmt: skip
        with torch.device("meta"):  # shapes only: nothing allocated
            compare(model_architecture(build_model(cfg)), arch, path)
    except ConfigError:
        raise
    except ValueError as err:  # unreadable, damaged, other sizes
        raise ConfigError(f"train.init_from: {err}") from None


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
