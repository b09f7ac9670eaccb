"""The `monitor` config group of pre-training (the online k-NN monitor, `pixio.monitor`): its
schema and its checks, apart from the monitor itself so that a config check loads no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixio.runtime.config import check_positive, require

SPLITS = ("train", "val")


@dataclass
class MonitorConfig:
    # folder with train/ and val/: class folders of images, or webdataset shards (*.tar) whose
    # samples hold a .cls label; null: no monitor
    knn_root: str | None = None
    every: int = 5000  # iterations between two k-NN evaluations
    train_images: int = 10000  # images in the fixed, seeded subset of train/ (the k-NN bank)
    val_images: int = 2000  # images in the subset of val/ classified against the bank
    img_size: int | None = None  # short side resize and centre crop (null: the model's img_size)
    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # votes weighted by exp(similarity / temperature)
    batch_size: int = 64  # images per forward and rank
    seed: int = 0  # draws the subsets
    build_demo: bool = False  # build the demo ImageFolder at knn_root first (monitor=demo)


def check_monitor(m: Any, patch: int) -> None:
    """The `monitor` group (nothing to check when knn_root is null); ConfigError names the key."""
    if m.knn_root is None:
        return
    check_positive(m, "monitor", "every", "train_images", "val_images", "k", "batch_size", "temperature")  # fmt: skip
    size = m.img_size
    require(size is None or (size > 0 and size % patch == 0), "monitor.img_size", f"{size} is not a positive multiple of the patch size {patch}")  # fmt: skip
    if m.build_demo:
        return
    for split in SPLITS:
        folder = Path(m.knn_root) / split
        require(folder.is_dir(), "monitor.knn_root", f"{folder} is not a directory (expected train/ and val/: class folders or .tar shards)")  # fmt: skip
