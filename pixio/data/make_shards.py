"""Write image files into webdataset tar shards the pre-training stream reads.

    python -m pixio.data.make_shards --images DIR_OR_GLOB --out DIR [--shard-size 1000] \
        [--kind web|imagenet] [--labels CSV | --labels-from-dirs] [--prefix NAME] \
        [--no-shuffle] [--seed 0] [--overwrite]

Samples are `<9-digit key>.jpeg` (web) or `.jpg` (imagenet), with `<key>.cls` when labelled.
JPEG files are copied byte for byte, other formats re-encoded as RGB JPEG quality 95; unreadable
files are logged and left out. See docs/data.md, "Shard writer".
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds

from pixio.data.images import DecodeError, load_rgb, open_image

log = logging.getLogger("pixio.data")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
DEFAULT_PREFIX = {"web": "shard", "imagenet": "imagenet-train"}
IMAGE_EXT = {"web": "jpeg", "imagenet": "jpg"}
JPEG_QUALITY = 95


def glob_base(spec: str) -> Path:
    """The directory part of a glob before its first wildcard."""
    fixed: list[str] = []
    for part in Path(spec).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def list_images(spec: str) -> tuple[list[Path], Path]:
    """Sorted image files of a directory (recursive) or a glob, and the directory they are under."""
    spec = os.path.expanduser(spec)
    if Path(spec).is_dir():
        base, found = Path(spec), Path(spec).rglob("*")
    else:
        base, found = glob_base(spec), (Path(p) for p in glob.glob(spec, recursive=True))
    images = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"no image file ({' '.join(sorted(IMAGE_SUFFIXES))}) in {spec}")
    return images, base


def order_images(images: list[Path], shuffle: bool, seed: int) -> list[Path]:
    """Sorted, then shuffled with `seed` so class-sorted folders do not give one-class shards."""
    if not shuffle:
        return list(images)
    order = np.random.default_rng(seed).permutation(len(images))
    return [images[i] for i in order]


def read_label_csv(path: Path) -> dict[str, str]:
    """`path,label` rows (an optional header row is skipped)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = [row for row in rows if len(row) < 2]
    if bad:
        raise ValueError(f"{path}: rows need `path,label`, got {bad[0]}")
    return {row[0].strip(): row[1].strip() for row in rows}


def raw_labels(images: list[Path], base: Path, csv_path: Path | None, from_dirs: bool):
    """image -> label text, or None when unlabelled; ValueError naming images without a label."""
    if from_dirs:
        return {p: p.parent.name for p in images}
    if csv_path is None:
        return None
    table = read_label_csv(csv_path)
    labels, missing = {}, []
    for p in images:
        rel = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name
        label = table.get(rel, table.get(p.name))
        if label is None:
            missing.append(str(p))
        labels[p] = label
    if missing:
        raise ValueError(f"{len(missing)} images have no label in {csv_path}, e.g. {missing[:3]}")
    return labels


def number_labels(labels: dict[Path, str]) -> tuple[dict[Path, int], list[str] | None]:
    """Integer labels kept; names numbered in sorted order (and returned as the class list)."""
    values = set(labels.values())
    if all(v.lstrip("-").isdigit() for v in values):
        return {p: int(v) for p, v in labels.items()}, None
    classes = sorted(values)
    index = {name: i for i, name in enumerate(classes)}
    return {p: index[v] for p, v in labels.items()}, classes


def jpeg_bytes(path: Path) -> bytes | None:
    """A JPEG file's own bytes, other formats as RGB JPEG q95; None (logged) if unreadable."""
    try:
        data = path.read_bytes()
        img = open_image(data)
        if img.format == "JPEG":
            load_rgb(data)  # decodes fully: a truncated JPEG is caught here, not in training
            return data
        buf = io.BytesIO()
        load_rgb(data).save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()
    except (OSError, DecodeError) as err:
        log.warning("left out %s: %s", path, err)
        return None


class ShardSink:
    """Writes numbered shards under temporary names, renamed when complete."""

    def __init__(self, out: Path, prefix: str, shard_size: int) -> None:
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.written: list[Path] = []
        self.count = 0
        self.writer: wds.TarWriter | None = None
        self.tmp: Path | None = None

    @property
    def current(self) -> Path:
        return self.out / f"{self.prefix}-{len(self.written):06d}.tar"

    def write(self, sample: dict) -> Path:
        """Add one sample; returns the shard it goes to."""
        if self.writer is None:
            self.tmp = self.out / f".{self.current.name}.tmp"
            self.writer = wds.TarWriter(str(self.tmp))
        self.writer.write(sample)
        self.count += 1
        target = self.current
        if self.count == self.shard_size:
            self.close()
        return target

    def close(self) -> None:
        """Finish the open shard (if any) and move it into place."""
        if self.writer is None:
            return
        self.writer.close()
        os.replace(self.tmp, self.current)
        self.written.append(self.current)
        self.writer, self.count = None, 0


def write_shards(
    images: list[Path],
    out: Path,
    prefix: str,
    kind: str,
    shard_size: int,
    labels: dict[Path, int] | None,
) -> tuple[list[Path], list[list[str]]]:
    """Write the shards; returns them and the manifest rows (key, shard, source, label)."""
    sink = ShardSink(out, prefix, shard_size)
    rows: list[list[str]] = []
    for path in images:
        data = jpeg_bytes(path)
        if data is None:
            continue
        key = f"{len(rows):09d}"
        sample = {"__key__": key, IMAGE_EXT[kind]: data}
        if labels is not None:
            sample["cls"] = labels[path]
        shard = sink.write(sample)
        rows.append([key, shard.name, str(path), "" if labels is None else str(labels[path])])
    sink.close()
    return sink.written, rows


def make_shards(args: argparse.Namespace) -> list[Path]:
    """Run the writer for parsed arguments; returns the shards written."""
    prefix = args.prefix or DEFAULT_PREFIX[args.kind]
    if args.kind == "imagenet" and "train" not in prefix:
        raise ValueError(
            f"imagenet shards are found as *train*.tar: prefix {prefix!r} lacks 'train'"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{len(existing)} {prefix}-*.tar shards exist in {out}; use --overwrite"
        )
    images, base = list_images(args.images)
    text = raw_labels(images, base, args.labels, args.labels_from_dirs)
    labels, classes = number_labels(text) if text is not None else (None, None)
    shards, rows = write_shards(
        order_images(images, not args.no_shuffle, args.seed), out, prefix, args.kind,
        args.shard_size, labels,
    )  # fmt: skip
    for stale in set(existing) - set(shards):
        stale.unlink()
    write_manifest(out / f"{prefix}-manifest.csv", rows)
    if classes is not None:
        (out / f"{prefix}-classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    log.info("%d of %d images in %d shards under %s", len(rows), len(images), len(shards), out)
    return shards


def write_manifest(path: Path, rows: list[list[str]]) -> None:
    """key, shard, source, label per sample."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "shard", "source", "label"])
        writer.writerows(rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Write images into webdataset tar shards.")
    parser.add_argument("--images", required=True, help="directory (recursive) or glob")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--kind", choices=("web", "imagenet"), default="web")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=Path, help="CSV of path,label rows")
    labels.add_argument("--labels-from-dirs", action="store_true", help="label = parent folder")
    parser.add_argument("--prefix", help="shard name prefix (default: shard / imagenet-train)")
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pixio.data.make_shards ...`"""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        make_shards(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"make_shards: {err}") from err


if __name__ == "__main__":
    main()
