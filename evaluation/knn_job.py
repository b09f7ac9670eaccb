"""The k-NN job of `python -m evaluation.knn` (whose docstring gives the protocol; the config
and its checks are `evaluation.knn_config`'s, which loads no torch): the image folders, every
image's global feature extracted once over all ranks, the classification on rank 0,
results.json and the optional features.pt. The loader's workers hand over uint8 crops, which
the device normalises (`normalize_images`, the trainer's), as in pre-training's pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import default_collate
from torchvision import datasets, transforms

from evaluation.datasets import UnreadableImageError
from evaluation.datasets.transforms import read_rgb
from evaluation.encoder_config import reference_side
from evaluation.features import encoder_digest, load_frozen_encoder
from evaluation.knn_config import check_output_owner
from evaluation.results import RESULTS_FILE, encoder_record
from pixio.knn import build_demo_folders, global_features, knn_evaluate
from pixio.models.features import FeatureEncoder
from pixio.runtime.atomic import atomic_path, write_text_atomic
from pixio.runtime.config import ConfigError, to_container
from pixio.runtime.distributed import DistInfo, barrier, is_dist, reduce_device
from pixio.runtime.job import DataError, OutputDirError, run_job
from pixio.runtime.logging import WandbLogger
from pixio.runtime.maploader import EvalLoader
from pixio.runtime.prefetch import normalize_images
from pixio.runtime.rank0 import rank0_result

log = logging.getLogger("pixio.knn")

FEATURES_NAME = "features.pt"


# ---- data -------------------------------------------------------------------------------------
def knn_transform(resize: int = 256, crop: int = 256) -> transforms.Compose:
    """Short side to `resize` (bicubic), center crop `crop`: uint8 (3, crop, crop). The ImageNet
    normalisation is the device's (`normalize_images` in `extract_features`): the workers hand
    over a quarter of float32's bytes."""
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.PILToTensor(),
        ]
    )


class Unreadable:
    """What `KnnImageFolder` gives for an image it cannot read: the reason, naming the file. Data,
    not an exception, so extraction reads on to the end of the set (one run lists every bad
    file) and the ranks stop together (`raise_unreadable`)."""

    def __init__(self, message: str) -> None:
        self.message = message


def read_image(path: str) -> Image.Image:
    """The RGB image ImageFolder's default loader gives; UnreadableImageError naming the file
    (truncated, not an image)."""
    return Image.fromarray(read_rgb(path))


class KnnImageFolder(datasets.ImageFolder):
    """An ImageFolder whose unreadable images come back as (`Unreadable`, -1) samples."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            return super().__getitem__(index)
        except UnreadableImageError as err:
            return Unreadable(str(err)), -1


def collate_images(items: list[tuple[Any, int]]) -> tuple[Any, Any]:
    """(images (B, 3, H, W), labels (B,)); a batch holding an unreadable image collates to
    (its `Unreadable` messages, None)."""
    bad = [x.message for x, _ in items if isinstance(x, Unreadable)]
    return (bad, None) if bad else default_collate(items)


def image_folders(root: str | Path, resize: int, crop: int) -> tuple[Any, Any]:
    """train/ and val/ ImageFolders; ConfigError unless both hold the same classes."""
    tf = knn_transform(resize, crop)
    train, val = (KnnImageFolder(str(Path(root) / s), transform=tf, loader=read_image) for s in ("train", "val"))  # fmt: skip
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise ConfigError(f"data.root: train/ and val/ hold different classes (e.g. {only})")
    return train, val


# ---- features ---------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(
    encoder: FeatureEncoder,
    dataset: Any,
    batch_size: int,
    info: DistInfo,
    num_workers: int = 0,
    precision: str = "fp32",
) -> torch.Tensor | None:
    """Features (N, D) of `dataset` in its order, each image extracted once over all ranks and
    gathered on rank 0 (CPU); None on the other ranks. Unreadable images: every rank reads on
    to the end, then all raise one DataError naming them (rank 0 logs each), so the whole set
    is checked in one run and no rank waits in the gather for one that stopped."""
    loader = EvalLoader(dataset, batch_size, info.rank, info.world_size, num_workers, collate_images)  # fmt: skip
    autocast = info.device.type == "cuda" and precision == "bf16"
    feats, real, unreadable = [], [], []
    for (images, _), is_real in loader:
        if isinstance(images, list):  # a batch with unreadable images (collate_images)
            unreadable += images
            continue
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            batch = normalize_images(images.to(info.device, non_blocking=True))  # (B, 3, H, W)
            feats.append(global_features(encoder, batch))
        real.append(is_real)
    raise_unreadable(unreadable, info)
    local = torch.cat(feats)  # (m, D): positions rank, rank + W, ... of the padded set
    return gather_positions(local, torch.cat(real), len(dataset), info)


def raise_unreadable(local: list[str], info: DistInfo) -> None:
    """Every rank's unreadable-image messages; if there are any, rank 0 logs each and every
    rank raises one DataError naming the first and counting the rest."""
    found = local
    if is_dist():
        everyone: list[list[str] | None] = [None] * info.world_size
        dist.all_gather_object(everyone, local)
        found = list(chain.from_iterable(m or [] for m in everyone))
    found = sorted(set(found))  # the padding repeats an image on several ranks
    if not found:
        return
    if info.is_main:
        for message in found:
            log.error("%s", message)
    more = f" (and {len(found) - 1} more, each in train.log)" if len(found) > 1 else ""
    raise DataError(f"{found[0]}{more}; replace or remove it: k-NN counts every image, and a skipped one would change the bank and the accuracy")  # fmt: skip


def gather_positions(
    local: torch.Tensor, real: torch.Tensor, n: int, info: DistInfo, rows: int = 65536
) -> torch.Tensor | None:
    """Rank r holds positions r, r + W, ... of the padded set (EvalLoader) with their `real`
    flags; rank 0 interleaves every rank's rows back into position order and keeps the real
    ones: (n, D) in dataset order. Gathered in slices of `rows` rows over all ranks (`rows // W`
    from each), so rank 0's receive buffer on its device is `rows` x (D + 1) floats whatever
    the number of ranks (336 MB at D = 1280; docs/evaluation.md)."""
    flagged = torch.cat([local.float(), real.to(local.device, torch.float32)[:, None]], dim=1)
    parts: list[list[torch.Tensor]] = [[] for _ in range(info.world_size)]
    per_rank = max(1, rows // info.world_size)  # every rank has as many rows: the same slices
    for start in range(0, flagged.shape[0], per_rank):
        piece = flagged[start : start + per_rank].contiguous().to(reduce_device())
        if not is_dist():
            parts[0].append(piece.cpu())
            continue
        bucket = [torch.empty_like(piece) for _ in parts] if info.is_main else None
        dist.gather(piece, bucket, dst=0)
        for r, t in enumerate(bucket or []):
            parts[r].append(t.cpu())
    if not info.is_main:
        return None
    stacked = torch.stack([torch.cat(p) for p in parts], dim=1)  # (m, W, D + 1): position j*W + r
    ordered = stacked.reshape(-1, stacked.shape[-1])
    kept = ordered[ordered[:, -1] > 0, :-1]
    if kept.shape[0] != n:  # every sample exactly once, or the bookkeeping is broken
        raise RuntimeError(f"gathered {kept.shape[0]} real samples, expected {n}")
    return kept


# ---- the app ----------------------------------------------------------------------------------
def results_table(results: dict[int, tuple[float, float]]) -> str:
    """A plain-text table: one row per k with top-1 and top-5 (percent)."""
    lines = [f"{'k':>5}  {'top-1':>7}  {'top-5':>7}"]
    lines += [f"{k:>5}  {t1:7.2f}  {t5:7.2f}" for k, (t1, t5) in sorted(results.items())]
    return "\n".join(lines)


def results_record(
    cfg: DictConfig,
    results: dict[int, tuple[float, float]],
    digest: str | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """results.json in the schema of the depth and segmentation runs (evaluation.results):
    task, dataset (`demo` for the demo folders), metric top-1, `best` (the best k) and `final`
    (the largest k), each labelled, the encoder record (its checkpoint's digest taken at
    the start; None: random weights); then every k (`by_k`, and `top1` / `top5` by k), sizes,
    timings, `extra` (protocol, architecture) and the resolved config. The demo (data.build_demo)
    is labelled `demo: true`: its 6 classes of photo crops are not ImageNet."""
    by_k = [{"k": k, "top1": t1, "top5": t5} for k, (t1, t5) in sorted(results.items())]
    best = max(by_k, key=lambda row: row["top1"])  # the first of equal ones: the smallest k
    encoder = encoder_record(cfg.encoder, digest)
    return {
        "task": "knn", "dataset": "imagenet", "demo": bool(cfg.data.build_demo), "head": None,
        "metric": "top1",
        "best": {"label": "best over k", **best},
        "final": {"label": "largest k", **by_k[-1]},
        "by_k": by_k,
        "top1": {str(row["k"]): row["top1"] for row in by_k},
        "top5": {str(row["k"]): row["top5"] for row in by_k},
        "encoder": encoder,
        "random_weights": encoder["random_weights"],  # also at the top, as k-NN files had it
        **extra,
        "config": to_container(cfg),
    }  # fmt: skip


def features_record(
    train_f: torch.Tensor, val_f: torch.Tensor, train_set: Any, val_set: Any
) -> dict[str, Any]:
    """What features.pt holds: train / val features (N, D), their labels and the class names."""
    return {
        "train": train_f.cpu(), "train_labels": torch.tensor(train_set.targets),
        "val": val_f.cpu(), "val_labels": torch.tensor(val_set.targets),
        "classes": list(train_set.classes),
    }  # fmt: skip


def save_features(path: Path, features: dict[str, Any]) -> None:
    """features.pt, atomically (a failed write leaves no partial file); OutputDirError naming
    it when it cannot be written (a full disk: results.json, written before, is complete)."""
    try:
        with atomic_path(path) as tmp:
            torch.save(features, tmp)
    except OSError as err:
        raise OutputDirError(
            f"cannot write {path}: {err.strerror or err}; {RESULTS_FILE} beside it is complete "
            f"(features.pt is optional: knn.save_features=false)"
        ) from None


def knn_protocol(resize: int, crop: int | None, patch: int) -> dict[str, Any]:
    """The resize and crop used (crop None: 256, or the patch's largest multiple up to 256),
    beside the reference's 256 / 256."""
    used = {"resize": resize, "crop": crop or reference_side(patch)}
    reference = {"resize": 256, "crop": 256}
    return {"patch_size": patch, **used, "reference": reference, "as_reference": used == reference}


def start_checks(cfg: DictConfig) -> str | None:
    """Rank 0, at the start: the checkpoint's digest (None: random weights), computed once for
    the folder check and results.json, and output_dir checked against it."""
    digest = encoder_digest(cfg.encoder)
    check_output_owner(cfg, sha256=digest)
    if (Path(cfg.output_dir) / RESULTS_FILE).exists():
        log.info("%s holds the results of an earlier k-NN of this encoder: this run replaces them", cfg.output_dir)  # fmt: skip
    return digest


def run_knn(cfg: DictConfig, info: DistInfo) -> tuple[dict[str, Any], dict[str, Any] | None] | None:  # fmt: skip
    """Extract train and val features over all ranks, classify on rank 0; there, the record
    and (knn.save_features) the features to save."""
    digest = rank0_result(lambda: start_checks(cfg))
    if cfg.data.build_demo and info.is_main:
        build_demo_folders(cfg.data.root)
    barrier()
    torch.manual_seed(0)  # a demo's random weights: the same in every run
    encoder = load_frozen_encoder(cfg.encoder, info.device, cfg.train.precision)
    protocol = knn_protocol(cfg.data.resize, cfg.data.crop, encoder.patch_size)
    train_set, val_set = image_folders(cfg.data.root, protocol["resize"], protocol["crop"])
    start = time.perf_counter()
    args = (cfg.train.batch_size, info, cfg.data.num_workers, cfg.train.precision)
    train_f = extract_features(encoder, train_set, *args)
    val_f = extract_features(encoder, val_set, *args)
    extract_s = time.perf_counter() - start
    if not info.is_main:
        return None
    start = time.perf_counter()
    results = knn_evaluate(
        train_f.to(info.device), torch.tensor(train_set.targets), val_f,
        torch.tensor(val_set.targets), list(cfg.knn.k), cfg.knn.temperature,
        len(train_set.classes), cfg.knn.chunk_size,
    )  # fmt: skip
    sizes = {"n_train": len(train_set), "n_val": len(val_set), "num_classes": len(train_set.classes)}  # fmt: skip
    timing = {"extract_s": round(extract_s, 2), "classify_s": round(time.perf_counter() - start, 2)}  # fmt: skip
    about = {"protocol": protocol, "architecture": encoder.describe()}
    record = results_record(cfg, results, digest, {**sizes, "feature_dim": train_f.shape[1], **timing, **about})  # fmt: skip
    features = features_record(train_f, val_f, train_set, val_set) if cfg.knn.save_features else None  # fmt: skip
    return record, features


def publish(cfg: DictConfig, record: dict[str, Any]) -> Path:
    """results.json (atomically), the table in the log, the accuracies to wandb."""
    path = write_text_atomic(Path(cfg.output_dir) / RESULTS_FILE, json.dumps(record, indent=2) + "\n")  # fmt: skip
    results = {int(k): (record["top1"][k], record["top5"][k]) for k in record["top1"]}
    log.info("k-NN (T=%g) on %d val images:\n%s", cfg.knn.temperature, record["n_val"], results_table(results))  # fmt: skip
    log.info("results in %s", path.resolve())
    logger = WandbLogger(cfg.logger, cfg.output_dir, record["config"], enabled=True)
    logger.log({f"knn/top{t}_k{k}": record[f"top{t}"][k] for t in (1, 5) for k in record["top1"]}, step=0)  # fmt: skip
    logger.finish()
    return path


def knn_job(cfg: DictConfig) -> None:
    """k-NN evaluation of one checked config: results.json, a table, wandb, then (optional)
    features.pt: the accuracies are on disk before the large optional file is written."""
    with run_job(cfg.output_dir, cfg.train.device, cfg.train.cpu_threads) as info:
        done = run_knn(cfg, info)
        if done is not None:
            record, features = done
            publish(cfg, record)
            if features is not None:
                save_features(Path(cfg.output_dir) / FEATURES_NAME, features)
        barrier()
