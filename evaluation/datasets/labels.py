"""Which label encoding a segmentation set's stored masks fit, and the warning for a `reduced`
set that looks raw.

ADE20K and LoveDA releases store 0 = other / no data and k = class k - 1 (`label_format=raw`,
remapped on the fly); re-encoded copies store 0..K-1 and 255 (`reduced`). A raw mask read as
reduced is not always refused: only a value K (ADE20K's 150, "flag", is rare) is out of range, so
every class silently moves by one and mIoU is near 0. The one visible sign is that a reduced set
has 255 somewhere, in nearly every ADE20K mask ("other" pixels); a raw one never does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from evaluation.datasets import transforms as T
from evaluation.datasets.info import DatasetInfo
from evaluation.datasets.splits import Pair

log = logging.getLogger("pixio.eval")

# Masks read when a reduced set is built: evenly spaced over the split, stopping at the first
# one that holds 255 (so one read when the set is right).
REDUCED_SAMPLE = 16


def fitting_formats(values: np.ndarray, info: DatasetInfo) -> list[str]:
    """The `label_format`s whose reading accepts every stored value in `values` (ints)."""
    k = info.num_classes
    reduced = bool(np.all((values < k) | (values == T.IGNORE_INDEX)))
    raw = bool(np.all(values <= k)) if info.reduce_zero_label else reduced
    return [name for name, ok in (("raw", raw), ("reduced", reduced)) if ok]


def format_ranges(info: DatasetInfo) -> str:
    """The stored values each format accepts, for messages."""
    k = info.num_classes
    reduced = f"0..{k - 1} and {T.IGNORE_INDEX}"
    return f"raw: 0..{k}, reduced: {reduced}" if info.reduce_zero_label else reduced


def describe_values(values: np.ndarray) -> str:
    """Sorted ints as runs: [0, 1, 2, 5, 255] -> "0-2, 5, 255"."""
    runs: list[list[int]] = []
    for v in (int(x) for x in np.sort(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def reduced_without_ignore(info: DatasetInfo, split: str, where: str) -> str:
    """The warning text for a reduced set with no 255 in `where` (the masks read)."""
    return (
        f"{info.name} {split} split: no 255 in {where}, but a reduced "
        f"{info.name} set marks other / no-data pixels 255: if these are the release's raw "
        "masks, every class is off by one (mIoU near 0); set data.label_format=raw "
        f"(python -m evaluation.prepare {info.name} ROOT --verify lists the stored values)"
    )


def warn_if_reduced_without_ignore(
    info: DatasetInfo, split: str, source: str | Path, pairs: list[Pair]
) -> None:
    """Read up to REDUCED_SAMPLE masks of a reduced set, evenly spaced, until one holds 255;
    warn once when none does."""
    n = len(pairs)
    positions = np.unique(np.linspace(0, n - 1, min(n, REDUCED_SAMPLE)).round().astype(int))
    for position in positions:
        if bool((T.read_plane(str(pairs[position][1])) == T.IGNORE_INDEX).any()):
            return
    where = f"the {len(positions)} masks sampled from {source}"
    log.warning(reduced_without_ignore(info, split, where))
