"""Online k-NN monitor: a small k-NN evaluation of the encoder being trained, every few
thousand iterations (pre-training's `monitor` group; the trainer runs it through the task's
`periodic` hook and logs `monitor/knn_top1`, `monitor/knn_top5` to metrics.jsonl and wandb).

`monitor.knn_root` holds `train/` and `val/`, each either class folders of images (an
ImageFolder, as the k-NN app reads) or webdataset shards (`*.tar`) whose samples carry a `.cls`
integer label. A fixed, seeded subset of `monitor.train_images` (the bank) and
`monitor.val_images` (classified against it) is chosen once, by rank 0 (one listing of the
folders per job, not per rank); shards are taken in a seeded order, their samples in order
(shards written by `pixio.data.make_shards` are shuffled), so only the shards that hold the
subset are opened. Each rank decodes its share (every W-th image) once, resized (short side,
bicubic) and centre-cropped to `monitor.img_size`, and keeps it as uint8 in host memory.
Unreadable images are skipped, counted and the first one named in the log; so are the shard
samples without a usable `.cls` label (`shard_samples`).

Each call: every rank encodes its share (the same number of batches on every rank, padded, so a
sharded encoder's collectives line up), the bank is all-gathered, each rank classifies its val
share against it (`pixio.knn.knn_hits`: the k-NN app's maths) and the hit counts are summed over
ranks. Feature: the mean class token of the last block before the final norm (`global_features`).
"""

from __future__ import annotations

import logging
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from pixio.data.images import DecodeError, load_rgb
from pixio.inference import IMAGE_SUFFIXES
from pixio.knn import build_demo_folders, global_features, knn_hits
from pixio.models.features import FeatureEncoder
from pixio.monitor_config import SPLITS, MonitorConfig, check_monitor  # noqa: F401 (re-exported)
from pixio.runtime.config import require
from pixio.runtime.distributed import DistInfo, is_dist, reduce_device
from pixio.runtime.parallel import unwrap
from pixio.runtime.prefetch import normalize_images
from pixio.runtime.rank0 import rank0_result

log = logging.getLogger("pixio.monitor")

SHARD_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image of a subset: a file, or a member of a tar (`offset`, `size` of its bytes)."""

    path: str
    label: int
    offset: int = -1  # -1: the whole file
    size: int = 0

    @property
    def name(self) -> str:
        return self.path if self.offset < 0 else f"{self.path}@{self.offset}"

    def read(self) -> bytes:
        with open(self.path, "rb") as handle:
            if self.offset < 0:
                return handle.read()
            handle.seek(self.offset)
            return handle.read(self.size)


def folder_samples(split: Path, classes: list[str]) -> list[Sample]:
    """Every image of an ImageFolder split, labelled by its class folder's index in `classes`."""
    out = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        out += [Sample(str(p), label) for p in files]
    return out


@dataclass
class LeftOut:
    """Samples of the shards read that a listing left out: how many, and the first of them
    (`<tar>@<key>: <why>`), so a caller reports them in one line, whatever their number."""

    count: int = 0
    first: str | None = None

    def add(self, reasons: list[str]) -> None:
        self.count += len(reasons)
        self.first = self.first or (reasons[0] if reasons else None)

    def describe(self) -> str:
        return f"{self.count} samples without a class label skipped (first: {self.first})"


def shard_samples(tar: Path) -> tuple[list[Sample], list[str]]:
    """The labelled images of one webdataset tar, in order (headers and `.cls` members read,
    image bytes skipped), and the samples left out, each `<tar>@<key>: <why>`: an image without
    a `.cls`, a `.cls` that is not a class index, a `.cls` without an image. Callers count and
    report the latter (`LeftOut`): none is dropped silently."""
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, str] = {}
    with tarfile.open(tar) as handle:
        for member in handle:
            key, dot, ext = member.name.partition(".")
            if not member.isfile() or not dot:
                continue
            if "." + ext.lower() in SHARD_IMAGE_EXTS:
                images[key] = member
            elif ext == "cls":
                data = handle.extractfile(member).read()  # type: ignore[union-attr]
                labels[key] = data.decode(errors="replace").strip()
    samples, skipped = [], []
    for key, member in images.items():
        text = labels.get(key)
        if text is None or not text.isdigit():
            why = "no .cls label" if text is None else f".cls {text[:20]!r} is not a class index"
            skipped.append(f"{tar}@{key}: {why}")
        else:
            samples.append(Sample(str(tar), int(text), member.offset_data, member.size))
    skipped += [f"{tar}@{key}: a .cls without an image" for key in labels if key not in images]
    return samples, skipped


def choose(root: Path, split: str, count: int, seed: int, classes: list[str] | None) -> tuple[list[Sample], LeftOut]:  # fmt: skip
    """The seeded subset of `count` samples of one split (all of it when smaller), and the
    samples of the shards read that were left out (`shard_samples`)."""
    folder = root / split
    tars = sorted(folder.glob("*.tar"))
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    left_out = LeftOut()
    if not tars:
        samples = folder_samples(folder, classes or [])
        picked = rng.permutation(len(samples))[:count]
        return [samples[i] for i in sorted(picked)], left_out
    chosen: list[Sample] = []
    for i in rng.permutation(len(tars)):
        samples, skipped = shard_samples(tars[i])
        chosen += samples[: count - len(chosen)]
        left_out.add(skipped)
        if len(chosen) >= count:
            break
    return chosen, left_out


def plan(cfg: Any) -> dict[str, Any]:
    """Rank 0: the train and val subsets, the class count and, per split, the shard samples left
    out for want of a label (`unlabelled`; ConfigError when a split holds no labelled image, or
    an ImageFolder's splits hold other classes)."""
    root = Path(cfg.knn_root)
    if cfg.build_demo:
        build_demo_folders(root)
    classes = None
    if not list((root / "train").glob("*.tar")):
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        others = sorted(p.name for p in (root / "val").iterdir() if p.is_dir())
        require(classes == others, "monitor.knn_root", f"train/ and val/ hold different classes (e.g. {sorted(set(classes) ^ set(others))[:5]})")  # fmt: skip
    counts = {"train": cfg.train_images, "val": cfg.val_images}
    picked = {s: choose(root, s, counts[s], cfg.seed, classes) for s in SPLITS}
    for split, (samples, left_out) in picked.items():
        why = f" ({left_out.describe()})" if left_out.count else ""
        require(bool(samples), "monitor.knn_root", f"{root / split} holds no labelled image{why}")
    labels = [s.label for samples, _ in picked.values() for s in samples]
    return {**{s: samples for s, (samples, _) in picked.items()},
            "num_classes": len(classes) if classes else max(labels) + 1,
            "unlabelled": {s: left_out for s, (_, left_out) in picked.items()}}  # fmt: skip


def decode(sample: Sample, side: int) -> torch.Tensor:
    """uint8 (3, side, side): short side resized to `side` (bicubic), centre crop."""
    img = load_rgb(sample.read())
    scale = side / min(img.size)
    w, h = max(side, round(img.width * scale)), max(side, round(img.height * scale))
    left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((w, h), Image.Resampling.BICUBIC).crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_share(samples: list[Sample], side: int, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor, list[str]]:  # fmt: skip
    """This rank's images (every W-th sample) as uint8 (m, 3, side, side) with labels (m,),
    padded to ceil(n / W) rows of label -1 so that every rank runs the same batches; and the
    samples it could not read ("<name>: <why>")."""
    rows = math.ceil(len(samples) / info.world_size)
    images = torch.zeros(rows, 3, side, side, dtype=torch.uint8)
    labels = torch.full((rows,), -1, dtype=torch.long)
    bad = []
    for row, sample in enumerate(samples[info.rank :: info.world_size]):
        try:
            images[row] = decode(sample, side)
            labels[row] = sample.label
        except (OSError, DecodeError, ValueError) as err:
            bad.append(f"{sample.name}: {err}")
    return images, labels, bad


def feature_encoder(module: nn.Module) -> FeatureEncoder:
    """The encoder inside what the trainer hands a task (torch.compile and DDP wrappers
    removed); an FSDP2 module gets `features` registered as a forward method once, so that the
    call gathers the root's parameters as forward() does."""
    module = unwrap(module)
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(module, FSDPModule) and not getattr(module, "_pixio_features_hooked", False):
        register_fsdp_forward_method(module, "features")
        module._pixio_features_hooked = True
    return module  # type: ignore[return-value]


class KnnMonitor:
    """The online k-NN monitor of one job (see the module doc). Built on every rank after the
    process group exists (collective); `__call__` is collective too."""

    def __init__(self, cfg: Any, img_size: int, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.side = cfg.img_size or img_size
        subsets = rank0_result(lambda: plan(cfg))
        self.num_classes = subsets["num_classes"]
        self.train, self.train_labels, bad = load_share(subsets["train"], self.side, info)
        self.val, self.val_labels, bad_val = load_share(subsets["val"], self.side, info)
        skipped = _gather_lists([bad, bad_val])  # [train's, val's] unreadable images
        if info.rank == 0:
            self._report(subsets, skipped)

    def _report(self, subsets: dict[str, Any], skipped: list[list[str]]) -> None:
        cfg = self.cfg
        n_train, n_val = (
            len(subsets[s]) - len(bad) for s, bad in zip(SPLITS, skipped, strict=True)
        )
        log.info(
            "k-NN monitor: %d train / %d val images of %s at %d px, %d classes, every %d "
            "iterations (k=%d, T=%g)", n_train, n_val, cfg.knn_root, self.side,
            self.num_classes, cfg.every, cfg.k, cfg.temperature,
        )  # fmt: skip
        bad = skipped[0] + skipped[1]
        if bad:
            log.warning("k-NN monitor: %d unreadable images skipped (first: %s)", len(bad), bad[0])
        for split, left_out in subsets["unlabelled"].items():
            if left_out.count:
                log.warning("k-NN monitor: %s of %s: %s", split, cfg.knn_root, left_out.describe())

    @torch.no_grad()
    def features(self, encoder: FeatureEncoder, images: torch.Tensor) -> torch.Tensor:
        """(m, D) global features of this rank's uint8 images, in batches."""
        device = next(encoder.parameters()).device
        out = []
        for start in range(0, images.shape[0], self.cfg.batch_size):
            batch = normalize_images(images[start : start + self.cfg.batch_size].to(device))
            out.append(global_features(encoder, batch))
        return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim, device=device)

    def __call__(self, module: nn.Module) -> dict[str, float]:
        """`monitor/knn_top1`, `monitor/knn_top5` (percent, the same on every rank) of the
        encoder in `module` (the MAE as the trainer hands it; call in eval mode, no grad)."""
        encoder = feature_encoder(module)
        bank, bank_labels = _gather_rows(self.features(encoder, self.train), self.train_labels)
        keep = self.val_labels >= 0
        val = self.features(encoder, self.val)[keep.to(bank.device)]
        k, cfg = self.cfg.k, self.cfg
        found = knn_hits(bank, bank_labels, val, self.val_labels[keep], [k], cfg.temperature, self.num_classes)[k]  # fmt: skip
        totals = torch.tensor([*found.tolist(), int(keep.sum())], dtype=torch.float64)
        if is_dist():
            totals = totals.to(reduce_device())
            dist.all_reduce(totals)
        top1, top5, n = totals.tolist()
        return {"monitor/knn_top1": 100 * top1 / n, "monitor/knn_top5": 100 * top5 / n}


def _gather_rows(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Every rank's (m, D) features with their labels, padding rows (label -1) dropped: the
    whole bank on every rank (ViT-H, 10,000 images: 51 MB in float32)."""
    labels = labels.to(features.device, features.dtype)[:, None]
    rows = torch.cat([features.float(), labels], dim=1)  # (m, D + 1): the label last
    if is_dist():
        device = reduce_device()
        parts = [torch.empty_like(rows, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.to(device))
        rows = torch.cat(parts).to(features.device)
    rows = rows[rows[:, -1] >= 0]
    return rows[:, :-1], rows[:, -1].long()


def _gather_lists(local: list[list[str]]) -> list[list[str]]:
    """Every rank's lists, each concatenated in rank order (one all_gather_object)."""
    if not is_dist():
        return local
    everyone: list[list[list[str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return [[x for part in everyone for x in (part or [])[i]] for i in range(len(local))]
