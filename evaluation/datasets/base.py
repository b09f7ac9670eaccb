"""Map-style depth and segmentation datasets over (image, target) pairs, and `build_dataset`.

Items (docs/reproduction.md): training crops of `crop_size` (default 256), validation full images.
- depth: {"image": (3, H, W) uint8 raw pixels (normalised on the device by the task's
  `to_device`), "depth": (1, H, W) float metres (0 = invalid),
  "index": int}; NYUv2 images and depths are Eigen-cropped in both splits.
- semseg: {"image": (3, H, W) uint8, "mask": (H, W) int64 in 0..K-1 and 255, "index": int}.
An image or target that cannot be read raises UnreadableImageError naming it, in validation (never
silently dropped) and in training too: skipping would change the epoch's length and batches, so
bad files are found up front with `python -m evaluation.prepare DATASET ROOT --verify`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from evaluation.datasets import transforms as T
from evaluation.datasets.info import EIGEN_CROP, LABEL_FORMATS, DatasetInfo, get_info
from evaluation.datasets.labels import warn_if_reduced_without_ignore
from evaluation.datasets.splits import (
    SPLITS,
    Pair,
    check_pairs,
    read_split_list,
    require_dir,
    scan_layout,
)
from pixio.runtime.distributed import is_main


class PairDataset(Dataset):
    """Shared part: the pairs, the split, the crop size."""

    def __init__(self, info: DatasetInfo, pairs: list[Pair], split: str, crop_size: int) -> None:
        self.info, self.pairs, self.split, self.crop_size = info, pairs, split, crop_size
        self.train = split == "train"

    def __len__(self) -> int:
        return len(self.pairs)

    def read_image(self, index: int) -> np.ndarray:
        return T.read_rgb(str(self.pairs[index][0]))

    def check_size(self, index: int, image: np.ndarray, target: np.ndarray) -> None:
        if image.shape[:2] != target.shape[:2]:
            image_path, target_path = self.pairs[index]
            raise T.UnreadableImageError(
                f"{image_path} is {image.shape[:2]} but its target {target_path} is "
                f"{target.shape[:2]}"
            )


class DepthDataset(PairDataset):
    """RGB + 16-bit png depth (value / `info.depth_scale` = metres; 0 = no measurement)."""

    def read_depth(self, index: int) -> np.ndarray:
        """(H, W) metres of the pair's 16-bit png; a png that cannot hold the release's encoding
        (1- or 8-bit, or values that are metres rather than metres x scale) names the file."""
        path = str(self.pairs[index][1])
        raw = T.read_plane(path)
        check_depth_encoding(raw, self.info, path)
        return raw.astype(np.float32) / np.float32(self.info.depth_scale)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, depth = self.read_image(index), self.read_depth(index)
        self.check_size(index, image, depth)
        if self.info.eigen_crop:
            path = str(self.pairs[index][0])
            image, depth = (
                T.eigen_crop(image, EIGEN_CROP, path),
                T.eigen_crop(depth, EIGEN_CROP, path),
            )
        if self.train:  # pads: black raw pixels, depth 0 (= invalid, so never in the loss)
            image, depth = T.random_flip(T.random_crop([image, depth], self.crop_size, [0, 0]))
        depth_t = torch.from_numpy(np.ascontiguousarray(depth))[None]
        return {"image": T.to_chw(image), "depth": depth_t, "index": index}


def check_depth_encoding(raw: np.ndarray, info: DatasetInfo, path: str) -> None:
    """A stored depth png must be 16-bit (metres x `info.depth_scale`). A 1- or 8-bit png cannot
    hold that range; one whose largest value is at most `info.max_depth` would mean every depth
    under max_depth / scale (1 cm for NYUv2, 31 cm for KITTI): depth written in metres. One max
    over the pixels (about 0.1 ms for a 480 x 640 frame)."""
    if raw.dtype.kind not in "ui" or raw.dtype.itemsize < 2:  # bool = 1-bit, uint8 = 8-bit
        bits = {"b": "1-bit", "u": "8-bit"}.get(raw.dtype.kind, str(raw.dtype))
        raise T.UnreadableImageError(f"{path}: expected a 16-bit depth png, got {bits}")
    largest = int(raw.max(initial=0))
    if 0 < largest <= info.max_depth:
        raise T.UnreadableImageError(
            f"{path}: its largest value is {largest}, so every depth would be under "
            f"{info.max_depth / info.depth_scale:.3g} m: depth stored in metres? {info.name} depth "
            f"pngs hold metres x {info.depth_scale:g}"
        )


class SegDataset(PairDataset):
    """RGB + single-channel mask (palette indices or grey values), remapped to 0..K-1 / 255."""

    def __init__(self, *args: Any, reduce_zero: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reduce_zero = reduce_zero
        self.scale_range = T.SEG_SCALE_RANGE  # of the training resize (tests pin it)
        # Stored values seen, when a caller asks (`prepare --verify`: np.zeros(65536, bool)).
        self.seen_labels: np.ndarray | None = None

    def read_mask(self, index: int) -> np.ndarray:
        path = str(self.pairs[index][1])
        raw = T.read_plane(path)
        if self.seen_labels is not None:  # before the remap, which refuses bad values
            self.seen_labels[np.flatnonzero(np.bincount(raw.ravel()))] = True
        return T.remap_labels(raw, self.info.num_classes, self.reduce_zero, path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self.read_image(index), self.read_mask(index)
        self.check_size(index, image, mask)
        if self.train:
            image, mask = T.random_rescale(image, mask, self.scale_range)
            crop = T.random_crop([image, mask], self.crop_size, [0, T.IGNORE_INDEX])
            image, mask = T.random_flip(crop)
        mask_t = torch.from_numpy(mask.astype(np.int64))  # a copy: PIL arrays are read-only
        return {"image": T.to_chw(image), "mask": mask_t, "index": index}


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    split_file: str | Path | None = None,
    crop_size: int = 256,
    *,
    label_format: str = "raw",
) -> Dataset:
    """The `split` ("train" | "val") of dataset `name` under `root`: pairs from `split_file`
    ("image target" lines relative to `root`) or, without one, from scanning the release layout.
    `label_format` "raw" remaps ADE20K / LoveDA release masks on the fly (0 -> 255, k -> k - 1);
    "reduced" reads files already holding 0..K-1 / 255 (e.g. the reference's re-encoded copies).
    Missing root, list or listed files are FileNotFoundError naming the path."""
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    root = require_dir(Path(root), f"{info.name} root")
    pairs = read_split_list(split_file, root) if split_file else scan_layout(info.name, root, split)
    check_pairs(pairs, split_file or root)
    dataset = dataset_from_pairs(info.name, pairs, split, crop_size, label_format=label_format)
    if label_format == "reduced" and info.reduce_zero_label and is_main():  # rank 0 reads
        warn_if_reduced_without_ignore(info, split, split_file or root, pairs)
    return dataset


def dataset_from_pairs(
    name: str, pairs: list[Pair], split: str, crop_size: int = 256, *, label_format: str = "raw"
) -> Dataset:
    """The dataset of `name` over given (image, target) pairs (see `build_dataset`)."""
    info = get_info(name)
    if info.task == "depth":
        return DepthDataset(info, pairs, split, crop_size)
    reduce_zero = info.reduce_zero_label and label_format == "raw"
    return SegDataset(info, pairs, split, crop_size, reduce_zero=reduce_zero)
