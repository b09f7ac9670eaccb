"""Configuration every Pixio job shares (train loop, optimiser, logger, launcher) and the checks
jobs compose into their own validation.

Every field has one line of doc. A job's schema (e.g. `pretraining/config.py`) adds its own
groups around these; its validation calls `validate_common` and the helpers below, which raise
`ConfigError("<key>: <why>")` before any model or GPU is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pixio.runtime.choices import COMPILE_CHOICES, OPTIMIZERS, PARALLEL_CHOICES, SCHEDULES
from pixio.runtime.launcher import (
    LauncherConfig,
    check_launcher_keys,
    hydra_overrides,
    launcher_config,
)
from pixio.runtime.threads import parse_cpu_threads


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | lars (MAE's linear probe: momentum 0.9, trust coefficient 1e-3)
    lr: float | None = None  # absolute lr; None -> blr * global_batch / 256
    blr: float = 1.5e-4  # base lr per 256 images
    min_lr: float = 0.0  # floor the schedule decays to
    weight_decay: float = 0.05  # AdamW weight decay (not on biases / norms / 1-d params)
    decay_all: bool = False  # decay every parameter, biases and norms too (evaluation heads)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    warmup_epochs: float = 40.0  # linear warmup length in epochs
    warmup_fraction: float | None = None  # warmup share of all iterations; replaces warmup_epochs
    schedule: str = "cosine"  # cosine (warmup + half-cycle) | poly (warmup + decay) | constant
    poly_power: float = 0.9  # exponent of the poly schedule
    clip_grad: float | None = None  # max grad norm; None = no clipping (norm still logged)
    fused: bool | None = None  # fused AdamW; None = on for CUDA


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per process (per GPU) per iteration
    epochs: int = 400  # schedule length in epochs
    iters_per_epoch: int | None = None  # iters per epoch; None = dataset length (a stream sets it)
    accum_iter: int = 1  # gradient accumulation: iterations per optimiser step
    save_every_iters: int = 1000  # full checkpoint period (multiple of accum_iter)
    keep_last: int = 2  # newest numbered checkpoints kept (checkpoint-last points at the newest)
    keep_every: int | None = None  # also keep numbered checkpoints at multiples of this
    async_save: bool | None = None  # write checkpoints in the background; None = on with CUDA
    log_every: int = 20  # console/metrics/wandb period in iterations
    vis_every: int = 1000  # picture period in iterations (the task's picture hook; 0 = off)
    val_every: int = 1  # validation period in epochs, jobs that validate (0 = only at the end)
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast dtype; fp16 uses a grad scaler)
    parallel: str = "auto"  # auto | none | ddp | fsdp (auto: per module, fsdp from 1B params)
    compile: str = "auto"  # auto | true | false: compile each block (auto: on for CUDA runs)
    deterministic: bool = False  # bit-exact GPU runs: deterministic kernels (slower)
    activation_checkpointing: bool = False  # recompute block activations in backward
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: str = "auto"  # torch CPU threads per process: N | auto (its cores / local ranks)
    seed: int = 0  # global seed (model init, masking, data order)
    max_iters: int | None = None  # stop (with a checkpoint) after this many iterations
    peak_tflops: float | None = None  # MFU's peak TFLOP/s per device; None = the GPU's bf16 peak


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "pixio"  # wandb project
    entity: str | None = None  # wandb entity (team or user)
    run_name: str | None = None  # wandb run name; None = output_dir's name
    mode: str | None = (
        None  # online | offline | disabled; None = wandb decides, offline w/o API key
    )
    tags: list[str] = field(default_factory=list)  # wandb tags


# ---- checks: each raises ConfigError("<key>: <why>") ---------------------------------------
_UNSET = object()


def require(ok: bool, key: str, message: str) -> None:
    """ConfigError("<key>: <message>") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def require_set(cfg: Any, *keys: str) -> None:
    """ConfigError naming the first dotted key (e.g. "data.root") that is absent or `???`."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    for key in keys:
        unset = OmegaConf.select(node, key, default=_UNSET, throw_on_missing=False) is _UNSET
        require(not unset, key, "is required (set it on the command line)")


def check_choice(node: Any, group: str, key: str, options: tuple[Any, ...]) -> None:
    """`<group>.<key>` must be one of `options`."""
    value = getattr(node, key)
    shown = ", ".join(str(o) for o in options)
    require(value in options, f"{group}.{key}", f"must be one of {shown}; got {value!r}")


def check_positive(node: Any, group: str, *keys: str, optional: bool = False) -> None:
    """Each `<group>.<key>` must be > 0 (or None when `optional`)."""
    for key in keys:
        value = getattr(node, key)
        if optional and value is None:
            continue
        require(value is not None and value > 0, f"{group}.{key}", f"must be positive, got {value}")


def check_train(t: Any) -> None:
    """The `train` group: loop lengths, periods, precision, parallelism, device."""
    check_positive(t, "train", "batch_size", "epochs", "accum_iter", "save_every_iters")
    check_positive(t, "train", "log_every", "keep_last")
    check_positive(t, "train", "iters_per_epoch", "max_iters", "keep_every", optional=True)
    check_positive(t, "train", "peak_tflops", optional=True)
    for key in ("vis_every", "val_every", "seed"):
        require(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    every, accum = t.save_every_iters, t.accum_iter
    require(every % accum == 0, "train.save_every_iters", f"{every} is not a multiple of train.accum_iter = {accum}")  # fmt: skip
    check_choice(t, "train", "precision", ("bf16", "fp16", "fp32"))
    check_choice(t, "train", "parallel", PARALLEL_CHOICES)
    check_choice(t, "train", "device", ("auto", "cpu", "cuda"))
    check_cpu_threads(t.cpu_threads)
    compile_ = str(t.compile).lower()  # Hydra types a bare true / false as a bool
    require(compile_ in COMPILE_CHOICES, "train.compile", f"must be one of auto, true, false; got {t.compile!r}")  # fmt: skip


def check_cpu_threads(value: Any, key: str = "train.cpu_threads") -> None:
    """auto or a positive integer (`pixio.runtime.threads`)."""
    try:
        parse_cpu_threads(value)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def check_optim(o: Any, t: Any) -> None:
    """The `optim` group: lr, AdamW terms, and the schedule (against `train.epochs`)."""
    check_choice(o, "optim", "name", OPTIMIZERS)
    require(not (o.name == "lars" and o.decay_all), "optim.decay_all", "applies to adamw; LARS never adapts or decays biases and 1-d parameters")  # fmt: skip
    require(o.lr is None or o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    check_positive(o, "optim", "blr")
    check_positive(o, "optim", "clip_grad", optional=True)
    for key in ("min_lr", "weight_decay"):
        require(getattr(o, key) >= 0, f"optim.{key}", f"must be >= 0, got {getattr(o, key)}")
    betas = list(o.betas)
    require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", f"must be two values in [0, 1), got {betas}")  # fmt: skip
    check_choice(o, "optim", "schedule", SCHEDULES)
    check_positive(o, "optim", "poly_power")
    if o.warmup_fraction is not None:  # it replaces warmup_epochs, which is then not checked
        require(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")  # fmt: skip
    else:
        require(0 <= o.warmup_epochs <= t.epochs, "optim.warmup_epochs", f"must be in [0, train.epochs], got {o.warmup_epochs}")  # fmt: skip


def check_logger(lg: Any) -> None:
    """The `logger` group: tracker name and wandb mode."""
    check_choice(lg, "logger", "name", ("wandb", "none"))
    check_choice(lg, "logger", "mode", (None, "online", "offline", "disabled"))


def check_launcher(node: Any, overrides: Sequence[str] | None = None) -> LauncherConfig:
    """The `launcher` group, as `launcher_config` reads it, and no key of the other launcher among
    this run's command-line `overrides` (default: Hydra's; none outside a Hydra app, e.g. inside
    the submitted SLURM job): `launcher.gpus=8` on a SLURM launch would be ignored. Its
    ValueErrors as ConfigError."""
    try:
        lc = launcher_config(node)
        check_launcher_keys(lc, hydra_overrides() if overrides is None else overrides)
    except ValueError as err:  # the messages already start with the key
        raise ConfigError(str(err)) from None
    return lc


def check_known_keys(node: Any, path: str = "") -> None:
    """Every key of a schema-typed group is a field of its dataclass, at any depth.

    Hydra applies a `+key=value` or `++key=value` override with `OmegaConf.update(...,
    force_add=True)`, which adds the key even to a struct-mode structured node, so
    `+train.epoch=1` composes, and nothing ever reads it. Dict-typed fields (`model_kwargs`,
    `dataset.lr`, `teacher.overrides`) take any key. ConfigError names the first unknown key and
    the field closest to it."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return
    if node._is_none() or node._is_missing() or node._is_interpolation():
        return
    if isinstance(node, ListConfig):
        for index in range(len(node)):
            check_known_keys(node._get_node(index), f"{path}[{index}]")
        return
    schema = OmegaConf.get_type(node)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None  # fmt: skip
    for key in node.keys():
        dotted = f"{path}.{key}" if path else str(key)
        if fields is not None and key not in fields:
            raise ConfigError(f"{dotted}: unknown key (a '+' override adds it, but nothing reads it){_closest(str(key), fields, path)}")  # fmt: skip
        check_known_keys(node._get_node(key), dotted)


def _closest(key: str, fields: list[str], path: str) -> str:
    """ "; did you mean <group>.<field>?" for the nearest field, else the group's fields."""
    near = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    group = f"{path}." if path else ""
    if near:
        return f"; did you mean {group}{near[0]}?"
    return f"; the keys of {path or 'the config'} are {', '.join(fields)}"


def validate_common(cfg: Any) -> None:
    """The groups every job shares: output_dir, train, optim, launcher, logger."""
    require_set(cfg, "output_dir")
    require(bool(cfg.output_dir), "output_dir", "is empty")
    check_train(cfg.train)
    check_optim(cfg.optim, cfg.train)
    check_launcher(cfg.launcher)
    check_logger(cfg.logger)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict (what checkpoints and wandb store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
