"""The linear probe's images: an ImageNet-layout split as a compact index, and the datasets that
decode it for training (RandomResizedCrop + flip) and validation (resize + centre crop).

A split is read in the two forms pre-training's online k-NN monitor reads (`pixio.monitor`,
whose readers list it): class folders (`train/<class>/*`, an ImageFolder: labels are the sorted
folder names' positions) or webdataset shards whose samples hold a `.cls` label, either in
`train/` / `val/` or, as pre-training finds its ImageNet shards, `*train*.tar` / `*val*.tar`
directly under the root (`imagenet1k-validation-*.tar` is a `val` shard).

The index holds numpy arrays, no Python object per image: 20 bytes per image (26 MB for the
1.28M ImageNet training images), plus the relative paths of a folder split as bytes (about 45
MB; a shard split names only its tars). Without per-image objects there are no reference counts
for the loader's workers to touch, so their copy-on-write pages stay shared. Rank 0 lists the
split once (the other ranks wait) and broadcasts the index. Items are
`{"image": uint8 (3, S, S), "label": int64, "index": int}`; the device normalises the images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from evaluation.datasets import UnreadableImageError
from pixio.data.images import DecodeError, decode_crop, load_rgb
from pixio.monitor import LeftOut, Sample, folder_samples, shard_samples
from pixio.runtime.config import ConfigError

log = logging.getLogger("pixio.eval")

SPLITS = ("train", "val")


@dataclass
class ImageIndex:
    """Every labelled image of one split: file `files[file[i]]` (relative to `root`), the
    bytes at `offset[i]` (-1: the whole file) of length `size[i]` in a tar, label `label[i]`."""

    root: str
    files: np.ndarray  # (F,) bytes: image files, or tar shards, relative to root
    file: np.ndarray  # (N,) int32: index into files
    offset: np.ndarray  # (N,) int64: byte offset of the image in its tar; -1: the whole file
    size: np.ndarray  # (N,) int32: bytes of the image in its tar
    label: np.ndarray  # (N,) int32: class id

    def __len__(self) -> int:
        return len(self.label)

    def sample(self, i: int) -> Sample:
        """The i-th image as the monitor's `Sample` (its path, label and place in a tar)."""
        path = str(Path(self.root) / self.files[self.file[i]].decode())
        return Sample(path, int(self.label[i]), int(self.offset[i]), int(self.size[i]))


def split_source(root: str | Path, split: str) -> Path | list[Path]:
    """Where a split's images are: `root/<split>` class folders, or its tar shards (in
    `root/<split>/`, or `root/*<split>*.tar`); ConfigError naming data.root when neither."""
    root = Path(root)
    folder = root / split
    if folder.is_dir():
        return sorted(folder.glob("*.tar")) or folder
    tars = sorted(root.glob(f"*{split}*.tar"))
    other = next(s for s in SPLITS if s != split)
    if both := [t.name for t in tars if other in t.name]:  # e.g. imagenet-train-val-0.tar
        raise ConfigError(f"data.root: {root / both[0]} names both {split} and {other}: rename it, or put the shards in {split}/ and {other}/")  # fmt: skip
    if not tars:
        raise ConfigError(f"data.root: {root} has neither {split}/ (class folders or .tar shards) nor *{split}*.tar shards")  # fmt: skip
    return tars


def class_names(root: str | Path) -> list[str] | None:
    """The class folders of train/ (None for shards: labels come from `.cls`); ConfigError
    unless val/ holds the same ones."""
    sources = [split_source(root, s) for s in SPLITS]
    shards = [isinstance(s, list) for s in sources]
    if all(shards):
        return None
    if any(shards):
        raise ConfigError(f"data.root: {root} holds class folders for one split and .tar shards for the other: use one form for both")  # fmt: skip
    train, val = ([p.name for p in sorted(s.iterdir()) if p.is_dir()] for s in sources)  # type: ignore[union-attr]
    if train != val:
        raise ConfigError(f"data.root: train/ and val/ hold different classes (e.g. {sorted(set(train) ^ set(val))[:5]})")  # fmt: skip
    return train


def list_samples(source: Path | list[Path], classes: list[str] | None) -> tuple[list[Sample], LeftOut]:  # fmt: skip
    """A split's samples: its class folders' images, or its shards' labelled ones (the samples
    without a usable `.cls` label left out and counted)."""
    left_out = LeftOut()
    if isinstance(source, Path):
        return folder_samples(source, classes or []), left_out
    samples = []
    for tar in source:
        found, skipped = shard_samples(tar)
        samples += found
        left_out.add(skipped)
    return samples, left_out


def build_index(root: str | Path, split: str, classes: list[str] | None) -> ImageIndex:
    """The index of one split (the monitor's listing of folders or shards; shard samples
    without a usable `.cls` label are skipped, counted and logged); ConfigError naming data.root
    when it holds no labelled image."""
    source = split_source(root, split)
    samples, left_out = list_samples(source, classes)
    where = source if isinstance(source, Path) else f"{root} ({split} shards)"
    why = f" ({left_out.describe()})" if left_out.count else ""
    if not samples:
        raise ConfigError(f"data.root: {where} holds no labelled image{why}")
    if left_out.count:
        log.warning("data.root: %s: %s", where, left_out.describe())
    root = Path(root)
    files = list(dict.fromkeys(s.path for s in samples))  # in order, each once
    position = {f: i for i, f in enumerate(files)}
    relative = np.array([str(Path(f).relative_to(root)).encode() for f in files])
    return ImageIndex(
        str(root), relative, np.array([position[s.path] for s in samples], dtype=np.int32),
        np.array([s.offset for s in samples], dtype=np.int64),
        np.array([s.size for s in samples], dtype=np.int32),
        np.array([s.label for s in samples], dtype=np.int32),
    )  # fmt: skip


def build_indexes(root: str | Path) -> tuple[ImageIndex, ImageIndex, int]:
    """(train index, val index, class count); ConfigError when a val label has no class of
    the training split. Call on rank 0 (`rank0_result`)."""
    classes = class_names(root)
    train, val = (build_index(root, s, classes) for s in SPLITS)
    num_classes = len(classes) if classes is not None else int(train.label.max()) + 1
    if int(val.label.max()) >= num_classes:
        raise ConfigError(f"data.root: val labels reach {int(val.label.max())}, but the training split has {num_classes} classes")  # fmt: skip
    return train, val, num_classes


@dataclass(frozen=True)
class TrainCrop:
    """RandomResizedCrop(`crop`, area `scale`, aspect 3/4-4/3, bicubic) and a horizontal flip
    (p 0.5), through pre-training's decoder (`pixio.data.images.decode_crop`: the box drawn
    on the stored size, a JPEG decoded at 1/2-1/8 where the crop allows). Random numbers
    from torch's generator, which `MapLoader` seeds per sample."""

    crop: int
    scale: tuple[float, float] = (0.08, 1.0)

    def __call__(self, data: bytes) -> torch.Tensor:
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        image = decode_crop(data, self.crop, rng, tuple(self.scale))  # (3, crop, crop) uint8
        return image.flip(-1) if bool(torch.rand(()) < 0.5) else image


@dataclass(frozen=True)
class CentreCrop:
    """Short side to `resize` (bicubic), centre crop `crop`: uint8 (3, crop, crop)."""

    resize: int
    crop: int

    def __call__(self, data: bytes) -> torch.Tensor:
        image: Image.Image = load_rgb(data)
        image = TF.resize(image, self.resize, InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(TF.center_crop(image, self.crop))


class LabelledImages(Dataset):
    """An `ImageIndex` decoded by `transform` (bytes -> uint8 image). An image that cannot be
    decoded raises UnreadableImageError naming it (a job error: one line): no image is dropped,
    since a skipped one would change the epoch's batches and the accuracy's denominator."""

    def __init__(self, index: ImageIndex, transform: Any) -> None:
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.index.sample(i)
        try:
            image = self.transform(sample.read())
        except (OSError, DecodeError) as err:
            raise UnreadableImageError(f"cannot read image {sample.name}: {err}") from err
        return {"image": image, "label": torch.tensor(sample.label), "index": i}
