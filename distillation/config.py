"""Distillation's configuration schema (backs `configs/distill.yaml`) and its validation.

`teacher`, `students`, `student`, `loss` and the masking keys are distillation's own; `data` is
the shared shard stream of `pixio.data.config` (its root defaults to a `paths` entry,
`pixio.runtime.paths`); `train`, `optim`, `launcher` and `logger` are the shared groups of
`pixio.runtime.config`. `validate_distill` checks every value, then the paths, before any model or
GPU is touched; ConfigError names the first bad key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from distillation.choices import CLS_LOSSES, FUSIONS, PATCH_LOSSES
from pixio.constants import DEFAULT_PATCH_SIZE as PATCH
from pixio.data.config import DataConfig, check_data_paths, check_data_values
from pixio.models.mask_counts import num_kept
from pixio.models.registry import encoder_kwargs, list_models
from pixio.runtime.config import (
    ConfigError,
    LauncherConfig,
    LoggerConfig,
    OptimConfig,
    TrainConfig,
    check_choice,
    require,
    require_set,
    validate_common,
)
from pixio.runtime.paths import PathsConfig, check_path_refs

DEMO_TEACHER_FILE = "encoder.safetensors"  # what `pretraining.train` exports into its output_dir
SIZE_KEYS = ("embed_dim", "depth", "num_heads")  # per-student size overrides (small models)
# Keys that fix parameter shapes: a resume cannot change them (plus the students' overrides).
SHAPE_KEYS = ("students", "img_size", "teacher.name", "teacher.n_cls_tokens", "teacher.embed_dim")


@dataclass
class TeacherConfig:
    name: str = MISSING  # registry name of the frozen teacher, e.g. pixio_vit5b16
    checkpoint: str = MISSING  # its weights: any file pixio.load_encoder reads (strict)
    # size its position table was trained at; null: the file's record, else the registry's
    img_size: int | None = None
    n_cls_tokens: int = 8  # class tokens of the teacher, and so of every student
    # size overrides for a file that records no architecture (a .pth, a checkpoint directory);
    # a file that records one builds from it, and a value here must then agree with it
    embed_dim: int | None = None  # override the registry width
    depth: int | None = None  # override the registry depth
    num_heads: int | None = None  # override the registry head count
    build_demo: bool = False  # a missing checkpoint: run the pre-training demo to make it


@dataclass
class StudentConfig:
    drop_path: float = 0.4  # stochastic depth of every student, linear over depth
    # per student name: {embed_dim, depth, num_heads} overrides of the registry size
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    cls: str = "cosine"  # class-token loss: cosine | l1 | mse | none (none: loss = patch term)
    patch: str = "cosine"  # visible patch-token loss: cosine | l1 | mse
    fuse: str = "avg"  # avg: (cls + patch) / 2 | sum: token-count weighted mean


@dataclass
class DistillConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)  # this machine's dataset roots
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the frozen encoder
    students: list[str] = MISSING  # student encoder names, e.g. [pixio_vit1b16, pixio_vith16]
    student: StudentConfig = field(default_factory=StudentConfig)  # settings of every student
    loss: LossConfig = field(default_factory=LossConfig)  # feature alignment loss
    img_size: int = 256  # training crop size; a multiple of patch_size * mask_grid
    mask_ratio: float = 0.5  # share of patch groups hidden from the students (0: no masking)
    mask_grid: int = 4  # side of the square patch groups masked together
    data: DataConfig = field(default_factory=DataConfig)  # shards and filters (as pre-training)
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW + schedule of every student
    train: TrainConfig = field(default_factory=TrainConfig)  # loop, precision, checkpoints
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # local or SLURM
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb
    output_dir: str = MISSING  # checkpoints, metrics.jsonl, vis/, encoder-<name>.safetensors


def register_configs() -> None:
    """Register the schema so Hydra type-checks every composed config."""
    ConfigStore.instance().store(name="distill_schema", node=DistillConfig)


def shape_keys(cfg: Any) -> tuple[str, ...]:
    """The keys a resume cannot change: SHAPE_KEYS and every student's size overrides."""
    sizes = [f"student.overrides.{n}.{k}" for n in cfg.students for k in SIZE_KEYS]
    return (*SHAPE_KEYS, *sizes)


def validate_distill(cfg: DictConfig | DistillConfig, teacher_may_be_missing: bool = False) -> None:
    """Check values, then paths, before anything is built; ConfigError names the first bad key.
    `teacher_may_be_missing`: the teacher checkpoint is about to be built (the demo)."""
    check_path_refs(cfg, "data.root")  # an unset paths.imagenet_wds / paths.web: the key to set
    require_set(cfg, "teacher.name", "teacher.checkpoint", "students", "data.root", "output_dir")
    validate_common(cfg)
    ipe = cfg.train.iters_per_epoch
    require(ipe is not None, "train.iters_per_epoch", "is required for distillation (a shard stream has no length)")  # fmt: skip
    _check_teacher(cfg.teacher)
    _check_students(cfg.students, cfg.student)
    _check_loss(cfg.loss)
    _check_masking(cfg)
    check_data_values(cfg.data)
    _check_paths(cfg, teacher_may_be_missing)


def teacher_build(t: Any) -> tuple[str, dict[str, Any]]:
    """(registry name, build_encoder keywords) of the teacher `t` (the `teacher` config node):
    the architecture its checkpoint records (a `.safetensors` file's header), else `t.name`
    with `t`'s sizes (null img_size: the registry's; so also while the checkpoint is unset or
    not made yet: meta-device plans). ArchitectureError naming each size in which `t`
    disagrees with the record; ValueError for an unreadable file."""
    from pixio.architecture import resolve  # torch: only when a teacher is read or built
    from pixio.checkpoint import read_architecture

    sizes = {k: getattr(t, k) for k in (*SIZE_KEYS, "img_size") if getattr(t, k) is not None}
    path = OmegaConf.select(t, "checkpoint", default=None)  # None while unset (???)
    arch = read_architecture(path, run_config=False) if path else None  # the header only
    return resolve(arch, t.name, {**sizes, "n_cls_tokens": t.n_cls_tokens}, str(path))


def _check_name(name: Any, key: str) -> None:
    models = list_models()
    require(name in models, key, f"unknown encoder {name!r}; valid: {', '.join(models)}")


def _check_teacher(t: Any) -> None:
    _check_name(t.name, "teacher.name")
    require(bool(t.checkpoint), "teacher.checkpoint", "is empty")
    size = t.img_size
    require(size is None or (size > 0 and size % PATCH == 0), "teacher.img_size", f"{size} is not a positive multiple of the patch size {PATCH}")  # fmt: skip
    require(t.n_cls_tokens >= 1, "teacher.n_cls_tokens", f"must be >= 1, got {t.n_cls_tokens}")
    for key in SIZE_KEYS:
        value = getattr(t, key)
        require(value is None or value >= 1, f"teacher.{key}", f"must be >= 1, got {value}")
    sizes = {k: getattr(t, k) for k in SIZE_KEYS if getattr(t, k) is not None}
    _check_sizes(t.name, sizes, "teacher")


def _check_students(names: Any, s: Any) -> None:
    names = list(names)
    require(len(names) >= 1, "students", "is empty: name at least one student encoder")
    for i, name in enumerate(names):
        _check_name(name, f"students[{i}]")
    dupes = sorted({n for n in names if names.count(n) > 1})
    require(not dupes, "students", f"duplicate student {', '.join(dupes)} (each name is one student, with its own checkpoint state)")  # fmt: skip
    require(0 <= s.drop_path < 1, "student.drop_path", f"must be in [0, 1), got {s.drop_path}")
    for name, sizes in dict(s.overrides).items():
        key = f"student.overrides.{name}"
        require(name in names, key, f"{name!r} is not one of the students ({', '.join(names)})")
        unknown = sorted(set(sizes) - set(SIZE_KEYS))
        require(not unknown, key, f"unknown key(s) {unknown}; valid: {', '.join(SIZE_KEYS)}")
        for k, v in dict(sizes).items():
            require(isinstance(v, int) and v >= 1, f"{key}.{k}", f"must be an integer >= 1, got {v!r}")  # fmt: skip
        _check_sizes(name, dict(sizes), key)


def _check_sizes(name: str, sizes: dict[str, Any], key: str) -> None:
    """The registry's own checks of a size override (e.g. width divisible by the heads)."""
    try:
        encoder_kwargs(name, **sizes)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def _check_loss(loss: Any) -> None:
    check_choice(loss, "loss", "cls", CLS_LOSSES)
    check_choice(loss, "loss", "patch", PATCH_LOSSES)
    check_choice(loss, "loss", "fuse", FUSIONS)


def _check_masking(cfg: Any) -> None:
    require(cfg.mask_grid >= 1, "mask_grid", f"must be >= 1, got {cfg.mask_grid}")
    size, unit = cfg.img_size, PATCH * cfg.mask_grid
    require(size > 0 and size % PATCH == 0, "img_size", f"{size} is not divisible by the patch size {PATCH}")  # fmt: skip
    require(0 <= cfg.mask_ratio < 1, "mask_ratio", f"must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.mask_ratio == 0:  # no masking: the group grid does not matter
        return
    require(size % unit == 0, "img_size", f"{size} is not divisible by {PATCH} * mask_grid = {unit}")  # fmt: skip
    groups = (size // unit) ** 2
    require(num_kept(groups, cfg.mask_ratio) >= 1, "mask_ratio", f"{cfg.mask_ratio} leaves no patch group visible ({groups} groups of {unit}x{unit} px at img_size {size})")  # fmt: skip


def _check_paths(cfg: Any, teacher_may_be_missing: bool) -> None:
    path = Path(cfg.teacher.checkpoint).expanduser()
    if cfg.teacher.build_demo:
        require(path.name == DEMO_TEACHER_FILE, "teacher.checkpoint", f"must end in {DEMO_TEACHER_FILE} with teacher.build_demo (the pre-training demo writes it), got {path}")  # fmt: skip
    if not teacher_may_be_missing:
        hint = " (teacher.build_demo=true makes it)" if cfg.teacher.build_demo else ""
        require(path.exists(), "teacher.checkpoint", f"{path} does not exist{hint}")
        try:  # the sizes it records agree with teacher.* (the tensors are checked at load)
            teacher_build(cfg.teacher)
        except ValueError as err:  # ArchitectureError included
            raise ConfigError(f"teacher.checkpoint: {err}") from None
    check_data_paths(cfg.data)
