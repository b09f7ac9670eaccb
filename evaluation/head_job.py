"""The depth / segmentation job (`python -m evaluation.depth`, `evaluation.semseg`): the frozen
encoder, the heads, the task and the data built from a checked config (`evaluation.common`,
which loads no torch), the trainer's run (`run_eval`), and `output_dir/results.json` with its
printed table.

The trainer keeps the best and the last validation in `val_results.json` and every validation in
`metrics.jsonl` (both rewound correctly on resume); at the end, rank 0 gathers them into
`results.json` with the config and the encoder checkpoint's sha256, hashed once at the start
(rank 0) and kept in the run's config (`encoder.sha256`), so a resume with another file is
refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from evaluation.common import check_output_owner, resolve_sizes, validate_eval
from evaluation.datasets import build_dataset, get_info
from evaluation.datasets.base import dataset_from_pairs
from evaluation.demo_data import ensure_demo, is_demo_root
from evaluation.encoder_config import ENCODER_FILE, ENCODER_SHAPE_KEYS
from evaluation.features import FrozenFeatures, encoder_digest, load_frozen_encoder
from evaluation.grid import build_grid
from evaluation.heads import DEPTH_BINS, build_head, convert_sync_bn, head_block_ids
from evaluation.report import encoder_label
from evaluation.results import RESULTS_FILE, encoder_record
from evaluation.selection import (
    ValidationRecords,
    drop_unchosen,
    holdout_choice,
    holdout_indices,
    measure_once,
    run_heads,
    selection_path,
    selection_results,
)
from evaluation.task import DepthTask, HeadTask, SegmentationTask, Windows
from pixio.runtime.atomic import write_text_atomic
from pixio.runtime.config import ConfigError, to_container
from pixio.runtime.distributed import DistInfo, barrier
from pixio.runtime.job import run_job
from pixio.runtime.maploader import EvalLoader, MapLoader
from pixio.runtime.rank0 import rank0_result
from pixio.runtime.runconfig import check_resume
from pixio.runtime.trainer import Trainer

log = logging.getLogger("pixio.eval")

# encoder.checkpoint, is allowed and logged).
SHAPE_KEYS = (
    *ENCODER_SHAPE_KEYS,
    "head.name", "dataset.name", "head.lrs", "head.depth_output", "head.bins_norm",
    "eval.select", "eval.holdout_fraction",
)  # fmt: skip
# What a run saved before these keys existed stands for (pixio.runtime.runconfig.check_resume).
INTRODUCED = {"encoder.source": "pixio", "head.depth_output": "regression", "head.bins_norm": "linear",
              "eval.select": "reference", "eval.holdout_fraction": 0.1}  # fmt: skip
# The checkpoint's digest, recorded in the run's config at the start: a resume must use the same
# file (it may have moved: the path is not compared, the digest is).


# ---- building -----------------------------------------------------------------------------------
def ensure_demo_data(cfg: Any, info: DistInfo) -> None:
    """The demo dataset at data.root (rank 0 builds it, or rebuilds one of an older version or
    other counts); the other ranks wait."""
    if info.rank == 0:
        d = cfg.data
        log.info("demo %s dataset in %s (evaluation.demo_data)", cfg.dataset.name, d.root)
        ensure_demo(cfg.dataset.name, d.root, d.demo_train, d.demo_val)
    barrier()


def is_demo_run(cfg: Any) -> bool:
    """Whether this run's data is a demo set: built by it (data.build_demo) or marked so
    (evaluation.demo_data's DEMO.json). Its results are labelled demo and never compared with
    the paper's."""
    return bool(cfg.data.build_demo) or is_demo_root(Path(cfg.data.root).expanduser())


class IterationLoader(MapLoader):
    """A MapLoader whose batches say which training iteration they are for (`iteration`, (B,)
    int64), so the task's pictures can name the step they show, also after a resume."""

    def iterate(self, start_iteration: int) -> Iterator[Any]:
        for it, batch in enumerate(super().iterate(start_iteration), start_iteration):
            batch["iteration"] = torch.full((len(batch["index"]),), it, dtype=torch.int64)
            yield batch


@dataclass
class Loaders:
    """A run's data: training crops, the validation split and, for eval.select=holdout, the
    held-out training images (validated like the validation split: full images)."""

    train: MapLoader
    val: EvalLoader
    holdout: EvalLoader | None = None


def build_loaders(cfg: Any, info: DistInfo) -> Loaders:
    """Training crops (shuffled, seeded per sample) and full validation images, one per batch
    (their sizes differ); with eval.select=holdout a seeded share of the training pairs is held
    out of training and read as full images. A data mistake is a one-line error before any model
    is built."""
    d = cfg.data
    try:
        train = build_dataset(cfg.dataset.name, d.root, "train", d.train_split, d.crop_size, label_format=d.label_format)  # fmt: skip
        val = build_dataset(cfg.dataset.name, d.root, "val", d.val_split, d.crop_size, label_format=d.label_format)  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.root: {err}") from None
    holdout = None
    if cfg.eval.select == "holdout":
        train, holdout = split_holdout(cfg, train)
    pin = info.device.type == "cuda"
    loader = IterationLoader(train, cfg.train.batch_size, info.rank, info.world_size, d.num_workers, cfg.train.seed, pin_memory=pin)  # fmt: skip
    val_loader = EvalLoader(val, 1, info.rank, info.world_size, d.num_workers)
    kept = None if holdout is None else EvalLoader(holdout, 1, info.rank, info.world_size, d.num_workers)  # fmt: skip
    held = "" if holdout is None else f", {len(holdout)} held out of training to choose on"
    log.info("data: %d training pairs%s, %d validation images", len(train), held, len(val))  # type: ignore[arg-type]
    return Loaders(loader, val_loader, kept)


def split_holdout(cfg: Any, train: Any) -> tuple[Any, Any]:
    """(training, holdout) datasets: `eval.holdout_fraction` of the training pairs, drawn with
    `train.seed`, read as validation reads (full images, no augmentation)."""
    try:
        rest, held = holdout_indices(len(train.pairs), cfg.eval.holdout_fraction, cfg.train.seed)
    except ValueError as err:
        raise ConfigError(f"eval.holdout_fraction: {err}") from None
    name, d = cfg.dataset.name, cfg.data
    make = lambda idx, split: dataset_from_pairs(name, [train.pairs[i] for i in idx], split, d.crop_size, label_format=d.label_format)  # noqa: E731  # fmt: skip
    return make(rest, "train"), make(held, "val")


def build_task(cfg: Any, app: str, info: DistInfo) -> HeadTask:
    """Frozen features for the heads' blocks, one head per lr (`head.lrs`, else optim.lr), each
    from train.seed (SyncBatchNorm on multi-GPU runs), the task."""
    torch.manual_seed(cfg.train.seed)  # a demo's random weights: the same in every run
    # to the GPU (no host copy per rank), its blocks already in the run's frozen dtype
    encoder = load_frozen_encoder(cfg.encoder, info.device, cfg.train.precision)
    features = FrozenFeatures(encoder, head_block_ids(cfg.head.name, encoder.depth))
    dataset = get_info(cfg.dataset.name)
    bins = app == "depth" and cfg.head.depth_output == "bins"
    out_channels = DEPTH_BINS if bins else 1 if app == "depth" else dataset.num_classes
    lrs = list(cfg.head.lrs or [cfg.optim.lr])
    grid = build_grid(lrs, lambda: build_head(cfg.head.name, encoder.embed_dim, out_channels), cfg.optim, "lr", cfg.train.seed)  # fmt: skip
    for h, run_head in zip(grid, run_heads({"head": {"lrs": lrs}}), strict=True):
        h.name = run_head.module  # one lr: module `head`, as before grids
        if info.device.type == "cuda":  # SyncBatchNorm needs GPUs; CPU (gloo) runs keep BatchNorm
            h.module = convert_sync_bn(h.module)
    e = cfg.eval
    val_source = f"{cfg.dataset.name} val split ({cfg.data.val_split or cfg.data.root})"
    common = dict(windows=Windows(e.window, e.stride, e.window_batch, e.tta, tuple(e.tta_scales)),
                  vis_dir=Path(cfg.output_dir) / "vis", vis_images=e.vis_images,
                  val_source=val_source)  # fmt: skip
    if app == "depth":
        return DepthTask(features, grid, None, **common, min_depth=dataset.min_depth, max_depth=dataset.max_depth,
                         depth_output=cfg.head.depth_output, bins_norm=cfg.head.bins_norm)  # fmt: skip
    return SegmentationTask(features, grid, None, **common, num_classes=dataset.num_classes,
                            class_names=dataset.class_names)  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------
REFERENCE_GPUS = 8  # the protocol trains every head on 8 GPUs


def warn_if_not_reference_world(world_size: int, batch_size: int) -> None:
    """The recipes' lr and BatchNorm statistics assume 8 processes (global batch 8 x the batch
    per GPU); another count trains a different recipe, which a user comparing numbers must know."""
    if world_size != REFERENCE_GPUS:
        log.warning(
            "%d process(es) x batch %d: the reference trains on %d GPUs (global batch %d); the "
            "results may differ from the published ones (launcher.gpus=%d on one node, or "
            "launcher=slurm)", world_size, batch_size, REFERENCE_GPUS,
            REFERENCE_GPUS * batch_size, REFERENCE_GPUS,
        )  # fmt: skip


def warn_if_not_reference_sizes(protocol: dict[str, Any]) -> None:
    """A crop / window other than the reference's 256 (patch 14: 252) is another protocol."""
    if not protocol["as_reference"]:
        log.warning(
            "crop %d, window %d, stride %d (patch %d): the reference protocol is 256 / 256 / 170; "
            "results.json records the sizes used (protocol)", protocol["crop_size"],
            protocol["window"], protocol["stride"], protocol["patch_size"],
        )  # fmt: skip


def run_eval(cfg: DictConfig, app: str) -> dict[str, Any] | None:
    """Train and validate the heads on the frozen encoder; with eval.select=holdout, measure the
    validation split once with the choice; returns results.json's content on rank 0 (None
    elsewhere)."""
    protocol = resolve_sizes(cfg, validate_eval(cfg, app))
    protocol["tta"] = tta_record(cfg.eval)
    with run_job(cfg.output_dir, cfg.train.device, cfg.train.cpu_threads) as info:
        warn_if_not_reference_sizes(protocol)
        config = to_container(cfg)
        # Hashed once per start, on rank 0; kept in the config (checkpoints, config.yaml) for
        # the resume check and results.json.
        config["encoder"]["sha256"] = rank0_result(lambda: encoder_digest(cfg.encoder))
        config["data"]["demo"] = is_demo_run(cfg)  # results.json's `demo`, the report's label
        check_resume(cfg.output_dir, config, SHAPE_KEYS, INTRODUCED, ENCODER_FILE)
        check_output_owner(cfg, app, sha256=config["encoder"]["sha256"])
        if cfg.data.build_demo:
            ensure_demo_data(cfg, info)
        data = build_loaders(cfg, info)  # data mistakes stop before the model
        warn_if_not_reference_world(info.world_size, cfg.train.batch_size)
        task = build_task(cfg, app, info)
        holdout = data.holdout is not None
        trainer = Trainer(
            cfg, task, data.train, info, config, data.holdout if holdout else data.val
        )
        task.after_summary = ValidationRecords(task, cfg.output_dir, trainer.iters_per_epoch, lambda: trainer.progress.iteration,  # fmt: skip
                                               keep_heads=holdout, split="holdout" if holdout else "val")  # fmt: skip
        vis_images, val_source = task.vis_images, task.val_source
        if holdout:  # training images: no `val_` pictures of them
            task.vis_images, task.val_source = 0, f"the holdout of {cfg.dataset.name}'s training split"  # fmt: skip
        trainer.fit()
        if trainer.progress.iteration < trainer.total_iters:  # train.max_iters: a partial run
            if info.rank == 0:
                log.info("stopped at iteration %d of %d (train.max_iters): results.json is written "
                         "when the schedule completes", trainer.progress.iteration, trainer.total_iters)  # fmt: skip
            return None
        measured = None
        if holdout:  # collective: every rank measures its share of the validation split
            task.after_summary, task.vis_images, task.val_source = None, vis_images, val_source
            measured = measure_choice(cfg, task, trainer, data.val)
        if info.rank != 0:
            return None
        extra = {"protocol": protocol, "architecture": task.features.encoder.describe()}
        results = write_results(
            cfg.output_dir, app, config, trainer.iters_per_epoch, extra, measured
        )
        print(results_table(results), flush=True)
        log.info("done: results.json, metrics.jsonl, vis/ in %s", Path(cfg.output_dir).resolve())
        return results


def tta_record(e: Any) -> dict[str, Any]:
    """results.json's `protocol.tta`: the mode and, for multiscale, the scales (each flipped)."""
    record: dict[str, Any] = {"mode": e.tta, "reference": "none"}
    if e.tta == "multiscale":
        record["scales"] = list(e.tta_scales)
    return record


def measure_choice(cfg: Any, task: HeadTask, trainer: Trainer, val: EvalLoader) -> dict[str, Any]:
    """eval.select=holdout, at the end: the head and epoch chosen on the holdout (rank 0 reads
    the history), the validation split measured once with its weights, the other kept weights
    removed. Collective."""
    heads = run_heads(trainer.config_dict)
    metric = task.validation.metric
    choice = rank0_result(lambda: holdout_choice(cfg.output_dir, trainer.iters_per_epoch, heads, metric))  # fmt: skip
    log.info("chosen on the holdout: %s at epoch %g (%s %.4g); measuring the validation split",
             choice[0], choice[1]["epoch"], metric, choice[1][metric])  # fmt: skip
    measured = measure_once(task, trainer.modules, val, trainer.device, cfg.train.precision, cfg.output_dir, choice)  # fmt: skip
    if trainer.info.rank == 0:
        drop_unchosen(cfg.output_dir, selection_path(cfg.output_dir, choice[0], choice[1]["iteration"]))  # fmt: skip
    return measured


# ---- results ------------------------------------------------------------------------------------
def write_results(
    output_dir: str | os.PathLike,
    app: str,
    config: dict[str, Any],
    iters_per_epoch: int,
    extra: dict[str, Any] | None = None,
    measured: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`results.json`, written atomically: every end-of-epoch validation, the reported result
    (`best`, labelled with its rule: by default the best over epochs) and the final one, the
    grid of heads and the reported one, the selection rule (`evaluation.selection`), the
    reported head's per-class or per-depth-bin table, whether the data was a demo set (`demo`,
    from the config's data.demo), the encoder (source, name, checkpoint, its sha256 as the
    config records it, random_weights), `extra` (the protocol's sizes and TTA, the encoder's
    architecture) and the config. `measured`: eval.select=holdout's one measurement."""
    chosen = selection_results(output_dir, config, iters_per_epoch, measured)
    table = chosen.pop("table")
    enc = config["encoder"]
    results = {
        "task": app,
        "dataset": config["dataset"]["name"],
        "demo": bool(config.get("data", {}).get("demo", False)),  # demo data: never beside the paper
        "head": config["head"]["name"],
        **chosen,
        ("per_depth_bin" if app == "depth" else "per_class"): table,
        "encoder": encoder_record(enc, enc.get("sha256")),
        **(extra or {}),
        "config": config,
    }  # fmt: skip
    write_text_atomic(Path(output_dir) / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return results


TABLE_KEYS = {
    "depth": ("d1", "d2", "d3", "abs_rel", "rmse", "silog"),
    "semseg": ("miou", "acc", "macc"),
}


def results_table(results: dict[str, Any]) -> str:
    """One line per validation, the reported and final ones (labelled), and for a grid one line
    per lr, the reported head marked."""
    keys = TABLE_KEYS[results["task"]]
    enc = results["encoder"]
    label = encoder_label(enc.get("source", "pixio"), enc["name"])
    select = results.get("select") or {"rule": "reference", "text": "best over epochs"}
    title = f"{results['task']} {results['dataset']} {results['head']} ({label}); reported: {select['text']}"  # fmt: skip
    grid = results.get("grid") or {}
    rows = [("", r) for r in results["epochs"]] + [("reported", results["best"]), ("final", results["final"])]  # fmt: skip
    if len(grid) > 1:
        rows += [(name, g["best"]) for name, g in grid.items()]
    w = max(10, *(len(name) for name, _ in rows))
    lines = [title, "  ".join(f"{h:>{w if i == 0 else 10}}" for i, h in enumerate(("", "epoch", *keys)))]  # fmt: skip
    for name, r in rows:
        mark = "  <- reported" if name == results.get("reported_head") and len(grid) > 1 else ""
        cells = [f"{name:>{w}}", f"{r['epoch']:>10.3g}", *(f"{r.get(k, float('nan')):>10.4g}" for k in keys)]  # fmt: skip
        lines.append("  ".join(cells) + mark)
    return "\n".join(lines)
