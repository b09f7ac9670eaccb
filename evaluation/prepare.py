"""Find the split lists of an evaluation dataset, write them, and compare their sizes to the
reference's (docs/reproduction.md, Datasets).

    python -m evaluation.prepare DATASET ROOT [--train-list F] [--val-list F]
        [--image-dir D] [--target-dir D] [--out DIR] [--verify] [--label-format raw|reduced]
        [--force]

Without `--*-list`, the release layout under ROOT is scanned (KITTI: its lists must already be at
ROOT/splits/). A given list may be in the reference's format or a BTS one (extra columns ignored;
lines whose target is "None", i.e. without ground truth, are dropped and counted; `--image-dir` /
`--target-dir` name the folders under ROOT its relative paths start from). The lists go
to `--out` (default ROOT/splits/{train,val}.txt) as "image target" lines relative to ROOT; a list
there that this command did not write is kept unless `--force`. Data files are never modified.
`--verify` decodes every pair and reports each unreadable file (a depth png that is not 16-bit or
holds metres, a label out of range, ...); for segmentation it also prints the stored label values
of each split and the `--label-format`s they fit; and it compares each split's count with the
published one (docs/reproduction.md, Datasets): equal, or a `warning:` naming both (a subset for
a trial run is fine; a full copy should match). Exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.datasets.info import (
    DATASETS,
    LABEL_FORMATS,
    VOC_PLAIN_TRAIN_SIZE,
    DatasetInfo,
    get_info,
)
from evaluation.datasets.splits import (
    LIST_HEADER,
    SPLITS,
    Pair,
    check_pairs,
    parse_split_lines,
    scan_layout,
    split_list_path,
    write_split_list,
)


class PrepareError(Exception):
    """A problem the user must fix (missing root, list or files); printed without a traceback."""


def load_list(
    path: Path, root: Path, image_dir: str = "", target_dir: str = ""
) -> tuple[list[Pair], int]:
    """Pairs of a user's list and the number of lines dropped for a "None" target. Relative image
    (target) paths are taken under ROOT/`image_dir` (ROOT/`target_dir`): BTS's KITTI lists name
    raw frames and ground truth relative to two different folders."""
    if not path.is_file():
        raise PrepareError(f"split list not found: {path}")
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        tokens = line.split()
        if tokens[1:2] == ["None"] and not tokens[0].startswith("#"):
            dropped += 1
            line = ""  # blank keeps the line numbers of parse errors right
        elif len(tokens) >= 2 and not tokens[0].startswith("#"):
            line = f"{_under(image_dir, tokens[0])} {_under(target_dir, tokens[1])}"
        kept.append(line)
    return parse_split_lines(kept, root, path), dropped


def _under(folder: str, token: str) -> str:
    return token if not folder or Path(token).is_absolute() else f"{folder}/{token}"


def collect(
    name: str, root: Path, split: str, list_file: Path | None, image_dir: str, target_dir: str
) -> tuple[list[Pair], int]:
    """This split's pairs (from `list_file` or the layout), checked to exist."""
    try:
        if list_file is not None:
            pairs, dropped = load_list(list_file, root, image_dir, target_dir)
        else:
            pairs, dropped = scan_layout(name, root, split), 0
        check_pairs(pairs, list_file or root)
    except (FileNotFoundError, ValueError) as err:
        raise PrepareError(str(err)) from err
    return pairs, dropped


def expected_size(info: DatasetInfo, split: str, pairs: list[Pair]) -> int:
    """The reference's size; VOC train is 10,582 with the SBD masks and 1,464 without."""
    if info.name == "pascal" and split == "train":
        if not any(target.parent.name == "SegmentationClassAug" for _, target in pairs):
            return VOC_PLAIN_TRAIN_SIZE
    return info.expected_sizes[SPLITS.index(split)]


def write_list(path: Path, root: Path, pairs: list[Pair], force: bool) -> str:
    """Write unless `path` holds a list this command did not write (and not `force`)."""
    if path.is_file() and not force:
        with open(path, encoding="utf-8") as handle:
            if handle.readline().rstrip("\n") != LIST_HEADER:
                return f"kept {path} (not written by prepare; --force replaces it)"
    write_split_list(path, root, pairs)
    return f"wrote {path}"


def verify(info: DatasetInfo, split: str, pairs: list[Pair], label_format: str) -> list[str]:
    """Decode every pair as validation does (no augmentation): one `unreadable:` note per bad
    pair, and for segmentation the stored label values and the formats they fit."""
    # Decoding loads torch (the datasets): only --verify does; --help and the lists never do.
    from evaluation.datasets.base import SegDataset, dataset_from_pairs
    from evaluation.datasets.transforms import UnreadableImageError

    dataset = dataset_from_pairs(info.name, pairs, "val", label_format=label_format)
    if isinstance(dataset, SegDataset):
        dataset.seen_labels = np.zeros(2**16, dtype=bool)  # masks are 8- or 16-bit
    notes = []
    for index in range(len(pairs)):
        try:
            dataset[index]
        except UnreadableImageError as err:
            notes.append(f"unreadable: {err}")
    if isinstance(dataset, SegDataset):
        values = np.flatnonzero(dataset.seen_labels)
        notes += label_notes(info, split, values, label_format, len(pairs))
    return notes


def count_note(info: DatasetInfo, split: str, found: int) -> str:
    """`<split>: N pairs, as published`, or a warning naming both counts and the usual causes
    (VOC's own 1,464 training pairs too: the published split adds SBD's)."""
    expected = info.expected_sizes[SPLITS.index(split)]
    if found == expected:
        return f"{split}: {found:,} pairs, as published"
    why = "a subset, missing files or another list"
    if info.name == "kitti":
        why += " (lines without ground truth are dropped: Eigen's test list has 697, 652 with it)"
    elif info.name == "pascal" and split == "train":
        why += " (10,582 needs SBD's SegmentationClassAug and train_aug.txt)"
    return f"warning: {info.name} {split}: {found:,} pairs, the published split has {expected:,}: {why}"  # fmt: skip


def label_notes(
    info: DatasetInfo, split: str, values: np.ndarray, label_format: str, masks: int
) -> list[str]:
    """`<split>: label values 0-150 fit label_format=raw`, and a warning for a reduced set
    without 255 (see evaluation/datasets/labels.py)."""
    from evaluation.datasets.labels import (  # torch, as `verify`: --verify only
        describe_values,
        fitting_formats,
        format_ranges,
        reduced_without_ignore,
    )

    fits = " and ".join(fitting_formats(values, info))
    fits = f"label_format={fits}" if fits else f"no label_format ({format_ranges(info)})"
    notes = [f"{split}: label values {describe_values(values)} fit {fits}"]
    if label_format == "reduced" and info.reduce_zero_label and 255 not in values:
        where = f"any of its {masks} masks"
        notes.append(f"warning: {reduced_without_ignore(info, split, where)}")
    return notes


def prepare_split(args: argparse.Namespace, info: DatasetInfo, split: str) -> tuple[str, list[str]]:
    """One split: its table row and its notes (written lists, dropped lines, errors)."""
    list_file = args.train_list if split == "train" else args.val_list
    pairs, dropped = collect(
        info.name, args.root, split, list_file, args.image_dir, args.target_dir
    )
    notes = [f"{split}: dropped {dropped} lines without ground truth (None)"] if dropped else []
    out = (args.out or args.root / "splits") / f"{split}.txt"
    if list_file is None and info.name == "kitti" and out == split_list_path(args.root, split):
        notes.append(f"read {out}")  # KITTI's layout is its list: nothing to write
    else:
        notes.append(write_list(out, args.root, pairs, args.force))
    expected = expected_size(info, split, pairs)
    if args.verify:
        notes += verify(info, split, pairs, args.label_format)
        notes.append(count_note(info, split, len(pairs)))
    return f"{info.name:<8} {split:<6} {len(pairs):>7} {expected:>9}", notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write and check evaluation split lists.")
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("root", type=Path)
    parser.add_argument("--train-list", type=Path, help="a list to use instead of scanning")
    parser.add_argument("--val-list", type=Path, help="a list to use instead of scanning")
    parser.add_argument("--image-dir", default="", help="folder under ROOT of list images")
    parser.add_argument("--target-dir", default="", help="folder under ROOT of list targets")
    parser.add_argument("--out", type=Path, help="folder of the lists (default ROOT/splits)")
    parser.add_argument("--verify", action="store_true", help="decode every pair")
    parser.add_argument("--label-format", choices=LABEL_FORMATS, default="raw")
    parser.add_argument("--force", action="store_true", help="replace lists not written here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print `dataset split found expected` rows, then notes; 1 if anything was wrong."""
    args = parse_args(argv)
    info = get_info(args.dataset)
    try:
        if not args.root.is_dir():
            raise PrepareError(f"dataset root not found: {args.root}")
        results = [prepare_split(args, info, split) for split in SPLITS]
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'dataset':<8} {'split':<6} {'found':>7} {'expected':>9}")
    print("\n".join(row for row, _ in results))
    notes = [note for _, split_notes in results for note in split_notes]
    print("\n".join(notes))
    return 1 if any(note.startswith("unreadable") for note in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
