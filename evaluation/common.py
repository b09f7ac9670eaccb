"""What the depth and segmentation apps share before their job starts: the config schema
(backs `configs/eval_depth.yaml` and `configs/eval_semseg.yaml`), its validation and the Hydra
entry (`cli_main`). Torch-free, so `--help`, `--cfg job` and a config error return before any
model library loads; the job itself (the encoder, heads, data, the trainer's run and
`results.json`) is `evaluation.head_job`, which `main` imports.

One run = one dataset x head: `python -m evaluation.depth dataset=kitti head=linear ...`.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from evaluation.choices import (
    BINS_NORMS,
    DEPTH_OUTPUTS,
    HEAD_KINDS,
    SELECT_RULES,
    TTA_MODES,
    TTA_SCALES,
    check_lrs,
)
from evaluation.datasets.info import LABEL_FORMATS, get_info
from evaluation.demo_data import demo_root_problem
from evaluation.encoder_config import (
    EncoderConfig,
    check_encoder,
    check_random_weights,
    check_side,
    reference_side,
    resolve_encoder_name,
)
from evaluation.results import app_identity, owner_problem
from pixio.runtime.config import (
    ConfigError,
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
from pixio.runtime.launcher import validate_and_launch
from pixio.runtime.paths import PathsConfig, check_path_refs

log = logging.getLogger("pixio.eval")

APPS = ("depth", "semseg")


# ---- schema -------------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    name: str = MISSING  # nyuv2 | kitti (depth); ade20k | pascal | loveda (semseg)
    lr: dict[str, float] = field(default_factory=dict)  # reference lr per head name (optim.lr)


@dataclass
class HeadConfig:
    name: str = MISSING  # dpt | linear
    lrs: list[float] | None = None  # one head per lr on the same features (None: optim.lr alone)
    depth_output: str = "regression"  # depth: regression (sigmoid * max depth) | bins (256 bins)
    bins_norm: str = "linear"  # bins: weights relu + 0.1 normalised (DINOv2's) | softmax


@dataclass
class EvalDataConfig:
    root: str = MISSING  # the dataset's root in its release's layout (default: paths.<dataset>)
    train_split: str | None = None  # "image target" list relative to root (None: scan / default)
    val_split: str | None = None  # same, for validation
    label_format: str = "raw"  # raw (release masks, remapped on the fly) | reduced (0..K-1/255)
    crop_size: int | None = None  # training crop (None: 256; patch 14: 252, see protocol_sizes)
    num_workers: int = 4  # data-loader workers per process (training and validation)
    build_demo: bool = False  # demo: build a tiny dataset in the real layout at root if absent
    demo_train: int = 8  # demo: training pairs
    demo_val: int = 3  # demo: validation pairs


@dataclass
class InferenceConfig:
    window: int | None = None  # sliding-window side (None: data.crop_size)
    stride: int | None = None  # window stride (None: int(window * 2 / 3), 170 for 256)
    window_batch: int = 16  # windows per encoder call (results do not depend on it)
    vis_images: int = 4  # validation images drawn at each validation (vis/val_<index>.png)
    tta: str = "none"  # test-time augmentation: none | flip | multiscale (tta_scales, each flipped)
    tta_scales: list[float] = field(default_factory=lambda: list(TTA_SCALES))  # multiscale's
    select: str = "reference"  # what is reported: reference (best val epoch) | last | holdout
    holdout_fraction: float = 0.1  # holdout: share of the training split kept to choose on


@dataclass
class EvalConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)  # this machine's dataset roots
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the frozen encoder
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # benchmark + reference lrs
    head: HeadConfig = field(default_factory=HeadConfig)  # dpt | linear
    data: EvalDataConfig = field(default_factory=EvalDataConfig)  # where the data is
    eval: InferenceConfig = field(default_factory=InferenceConfig)  # validation inference
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW on the head only
    train: TrainConfig = field(default_factory=TrainConfig)  # loop, precision, checkpoints
    launcher: LauncherConfig = field(default_factory=LauncherConfig)  # local or SLURM
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb
    output_root: str = "outputs/eval"  # where a sweep's runs go (one folder per dataset x head)
    output_dir: str = MISSING  # this run: checkpoints, metrics.jsonl, results.json, vis/


def register_configs() -> None:
    """Register the schema so Hydra type-checks every composed eval config."""
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


# ---- validation ---------------------------------------------------------------------------------
def validate_eval(cfg: Any, app: str) -> int:
    """Check values, then paths, before anything is built; ConfigError names the first bad key.
    Returns the encoder's patch size (the null sizes follow it). The checks that need torch come
    after the values and paths, so a mistake found before them returns without loading it."""
    check_path_refs(cfg, "data.root")  # an unset paths.<dataset>: name the key to set
    require_set(cfg, "encoder.name", "dataset.name", "head.name", "data.root", "output_dir")
    check_choice(cfg.head, "head", "name", HEAD_KINDS)  # before optim.lr, which reads it
    resolve_encoder_name(cfg)  # before output_dir, which may name it
    _check_dataset(cfg, app)
    validate_common(cfg)
    check_choice(cfg.data, "data", "label_format", LABEL_FORMATS)
    check_positive(cfg.data, "data", "demo_train", "demo_val")
    require(cfg.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")  # fmt: skip
    check_positive(cfg.eval, "eval", "window_batch")
    require(cfg.eval.vis_images >= 0, "eval.vis_images", f"must be >= 0, got {cfg.eval.vis_images}")  # fmt: skip
    check_heads(cfg, app)
    check_selection(cfg.eval)
    _check_paths(cfg.data)
    # A checkpoint's recorded architecture and a baseline's meta build load torch; the memory
    # estimate (heads on the meta device) too, so it comes last.
    patch = check_encoder(cfg)
    check_sizes(cfg, patch)
    check_random_weights(cfg)
    check_output_owner(cfg, app)
    from evaluation.memory import check_memory

    check_memory(cfg, app, patch, protocol_sizes(patch, cfg.data.crop_size, cfg.eval.window, cfg.eval.stride))  # fmt: skip
    return patch


def check_heads(cfg: Any, app: str) -> None:
    """`head.lrs` (positive, distinct), `head.depth_output` (bins: depth only), `head.bins_norm`."""
    h = cfg.head
    if h.lrs is not None:
        check_lrs(h.lrs, "head.lrs")
    check_choice(h, "head", "depth_output", DEPTH_OUTPUTS)
    check_choice(h, "head", "bins_norm", BINS_NORMS)
    require(app == "depth" or h.depth_output == "regression", "head.depth_output", f"{h.depth_output} applies to depth (python -m evaluation.depth), not {app}")  # fmt: skip


def check_selection(e: Any) -> None:
    """`eval.select`, `eval.holdout_fraction` in (0, 1), `eval.tta` and positive `eval.tta_scales`."""
    check_choice(e, "eval", "select", SELECT_RULES)
    require(0 < e.holdout_fraction < 1, "eval.holdout_fraction", f"must be in (0, 1), got {e.holdout_fraction}")  # fmt: skip
    check_choice(e, "eval", "tta", TTA_MODES)
    scales = list(e.tta_scales)
    require(len(scales) > 0 and all(s > 0 for s in scales), "eval.tta_scales", f"must be positive scales, got {scales}")  # fmt: skip


def check_output_owner(cfg: Any, app: str, **digest: str | None) -> None:
    """ConfigError unless output_dir is free for this run's results.json: no results there, or
    its own (same task, dataset, head, encoder; with `sha256=`, the same checkpoint file)."""
    identity = app_identity(app, cfg.encoder, cfg.dataset.name, cfg.head.name, **digest)
    problem = owner_problem(cfg.output_dir, identity)
    require(problem is None, "output_dir", str(problem))


REFERENCE_SIZES = {"crop_size": 256, "window": 256, "stride": 170}  # the protocol, patch 16


def protocol_sizes(patch: int, crop: int | None, window: int | None, stride: int | None) -> dict[str, int]:  # fmt: skip
    """Crop, window and stride for an encoder of this patch size: those given, else the
    reference's 256 / 256 / 170 for patch 16, and for another patch the largest multiple of it
    up to 256 (patch 14: 252 / 252 / 168); the window defaults to the crop, the stride to two
    thirds of the window."""
    crop = crop or reference_side(patch)
    window = window or crop  # a crop chosen for a baseline (e.g. 224) is its window too
    return {"crop_size": crop, "window": window, "stride": stride or int(window * 2 / 3)}


def check_sizes(cfg: Any, patch: int) -> None:
    """Explicit crop / window / stride: positive, and the crop and window multiples of the patch."""
    check_side(cfg.data.crop_size, "data.crop_size", patch)
    check_side(cfg.eval.window, "eval.window", patch)
    require(cfg.eval.stride is None or cfg.eval.stride > 0, "eval.stride", f"must be positive, got {cfg.eval.stride}")  # fmt: skip


def resolve_sizes(cfg: Any, patch: int) -> dict[str, Any]:
    """Fill null crop / window / stride in `cfg` for this patch size; the protocol record of
    results.json (the sizes used, the reference's, and whether they differ)."""
    sizes = protocol_sizes(patch, cfg.data.crop_size, cfg.eval.window, cfg.eval.stride)
    cfg.data.crop_size, cfg.eval.window, cfg.eval.stride = (sizes[k] for k in ("crop_size", "window", "stride"))  # fmt: skip
    return {"patch_size": patch, **sizes, "reference": REFERENCE_SIZES,
            "as_reference": sizes == REFERENCE_SIZES}  # fmt: skip


def _check_dataset(cfg: Any, app: str) -> None:
    try:
        info = get_info(cfg.dataset.name)
    except ValueError as err:
        raise ConfigError(f"dataset.name: {err}") from None
    lrs = cfg.dataset.lr
    require(cfg.head.name in lrs, "dataset.lr", f"has no lr for head {cfg.head.name!r} (set optim.lr or dataset.lr.{cfg.head.name})")  # fmt: skip
    require(info.task == app, "dataset", f"{info.name} is a {info.task} dataset, not one for python -m evaluation.{app}")  # fmt: skip


def _check_paths(d: Any) -> None:
    root = Path(d.root).expanduser()
    if not d.build_demo:
        require(root.is_dir(), "data.root", f"{root} does not exist or is not a directory")
    else:  # built, reused or rebuilt there: never real data, nor an unmarked older demo set
        problem = demo_root_problem(root)
        require(problem is None, "data.root", str(problem))
    for key in ("train_split", "val_split"):
        split = d[key]
        if split is not None:
            require(Path(split).expanduser().is_file(), f"data.{key}", f"{split} does not exist or is not a file")  # fmt: skip


SWEEPABLE = ("dataset", "head")  # the keys a sweep's folder names tell apart


def swept_keys(args: list[str]) -> list[str]:
    """Keys given several values on a Hydra command line (`k=a,b`, `k=range(..)`, ...)."""
    keys = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        flat = re.sub(r"\[[^\]]*\]|\{[^}]*\}|'[^']*'|\"[^\"]*\"", "", value)  # lists, quotes
        if "," in flat or re.match(r"(range|choice|glob)\(", value):
            keys.append(key.lstrip("+~"))
    return keys


def check_sweep_output(overrides: list[str], multirun: bool, swept: list[str] = ()) -> None:
    """A sweep gives each job `output_root/<dataset>_<head>`; one output_dir for all, or a sweep
    over another key, would make the jobs resume each other's checkpoints."""
    if not multirun:
        return
    pinned = any(o.lstrip("+").split("=", 1)[0] == "output_dir" for o in overrides)
    require(not pinned, "output_dir", "is set for a sweep (-m): set output_root instead (each job writes output_root/<dataset>_<head>)")  # fmt: skip
    for key in swept:
        require(key in SWEEPABLE, key, "a sweep (-m) may vary dataset and head only (each job's folder is output_root/<dataset>_<head>); run other values as separate commands with their own output_root")  # fmt: skip


def cli_main(cfg: DictConfig, app: str, main: Any) -> None:
    """The Hydra entry: validate (one `config error:` line, exit 2), then launch `main`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    def validate(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        check_sweep_output(list(hydra_cfg.overrides.task), multirun, swept_keys(sys.argv[1:]))
        validate_eval(cfg, app)

    validate_and_launch(main, cfg, validate)
