"""Split lists ("image target" lines relative to the root) and the on-disk layouts they index.

A list line holds at least two whitespace-separated paths; further columns (the focal length of
the BTS lists) are ignored, blank lines and lines starting with "#" are skipped. Relative paths are
joined to the dataset root, absolute ones are kept. Without a list, `scan_layout` finds the pairs
of a public release's layout; KITTI has no train / val structure on disk, so its split is always
a list (by default `<root>/splits/{train,val}.txt`, which `python -m evaluation.prepare` writes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from evaluation.datasets.info import get_info

Pair = tuple[Path, Path]
SPLITS = ("train", "val")
LIST_HEADER = "# written by python -m evaluation.prepare"


def split_list_path(root: str | Path, split: str) -> Path:
    """Where `prepare` writes (and KITTI looks for) the list of `split`."""
    return Path(root) / "splits" / f"{split}.txt"


def _resolve(root: Path, token: str) -> Path:
    path = Path(token)
    return path if path.is_absolute() else root / path


def read_split_list(path: str | Path, root: str | Path) -> list[Pair]:
    """(image, target) pairs of a split list; FileNotFoundError names a missing list, ValueError
    a malformed line (a "None" target of the BTS lists too: `prepare` filters those)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    return parse_split_lines(path.read_text(encoding="utf-8").splitlines(), root, path)


def parse_split_lines(lines: Iterable[str], root: str | Path, source: str | Path) -> list[Pair]:
    """Pairs of "image target [ignored...]" lines; errors name `source` and the line number."""
    root, pairs, seen = Path(root), [], {}
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if len(tokens) < 2 or tokens[1] == "None":
            raise ValueError(f"{source}:{number}: expected 'image target', got {line.strip()!r}")
        pair = (_resolve(root, tokens[0]), _resolve(root, tokens[1]))
        refuse_repeat(seen, pair, number, source, f"{tokens[0]} {tokens[1]}")
        pairs.append(pair)
    return pairs


def refuse_repeat(seen: dict, key: object, number: int, source: str | Path, shown: str) -> None:
    """ValueError naming `source`, the line and the first one when `key` was seen before: a
    repeated pair would count twice in every epoch and in the validation metrics."""
    first = seen.setdefault(key, number)
    if first != number:
        raise ValueError(f"{source}:{number}: {shown} is listed twice (first on line {first})")


def write_split_list(path: str | Path, root: str | Path, pairs: Iterable[Pair]) -> int:
    """Write `pairs` as "image target" lines relative to `root` (the reference's format) under a
    header line that marks the file as generated; returns the number of lines."""
    path, root = Path(path), Path(root)
    lines = [LIST_HEADER]
    for image, target in pairs:
        lines.append(f"{_relative(image, root)} {_relative(target, root)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines) - 1


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # outside the root: kept absolute, which `read_split_list` accepts
        return str(path)


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a folder, else FileNotFoundError naming it and what was expected there."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _pair_by_stem(images: Path, image_glob: str, target_of: Callable[[Path], Path]) -> list[Pair]:
    """Every image matching `image_glob` under `images` with its target `target_of(image)`; an
    image without its target is an error naming both (never silently dropped)."""
    pairs = []
    for image in sorted(images.glob(image_glob)):
        target = target_of(image)
        if not target.is_file():
            raise FileNotFoundError(f"no target {target} for image {image}")
        pairs.append((image, target))
    if not pairs:
        raise FileNotFoundError(f"no images matching {image_glob} under {images}")
    return pairs


def _nyu_depth_of(image: Path) -> Path:
    return image.with_name(image.stem.replace("rgb_", "sync_depth_", 1) + ".png")


def _scan_nyuv2(root: Path, split: str) -> list[Pair]:
    # BTS / ZoeDepth layout: sync/<scene>/rgb_N.jpg (train), official_splits/test/<scene>/ (val).
    base = require_dir(root / ("sync" if split == "train" else "official_splits/test"), "NYUv2")
    return _pair_by_stem(base, "*/rgb_*.jpg", _nyu_depth_of)


def _scan_ade20k(root: Path, split: str) -> list[Pair]:
    folder = "training" if split == "train" else "validation"
    images = require_dir(root / "images" / folder, "ADE20K images")
    annotations = require_dir(root / "annotations" / folder, "ADE20K annotations")
    return _pair_by_stem(images, "*.jpg", lambda p: annotations / f"{p.stem}.png")


def _scan_loveda(root: Path, split: str) -> list[Pair]:
    # Train/Train/{Rural,Urban}/{images_png,masks_png}/N.png; a single Train/ level also works.
    top = "Train" if split == "train" else "Val"
    base = root / top / top if (root / top / top).is_dir() else root / top
    require_dir(base, "LoveDA split folder")
    domains = [d for d in ("Rural", "Urban") if (base / d).is_dir()]
    if not domains:  # name the folder a user should look for
        require_dir(base / "Rural", "LoveDA domain (Rural or Urban)")
    pairs = []
    for domain in domains:
        images = require_dir(base / domain / "images_png", "LoveDA images")
        masks = require_dir(base / domain / "masks_png", "LoveDA masks")
        pairs += _pair_by_stem(images, "*.png", lambda p, m=masks: m / p.name)
    return pairs


def voc_root(root: Path) -> Path:
    """The VOC2012 folder: `root` itself or `root/VOC2012` (a VOCdevkit given as the root)."""
    nested = root / "VOC2012"
    return nested if not (root / "JPEGImages").is_dir() and nested.is_dir() else root


def _scan_pascal(root: Path, split: str) -> list[Pair]:
    """ImageSets/Segmentation/{train,val}.txt ids; for train, the SBD-augmented list
    (train_aug.txt, or aug.txt as mmsegmentation names it) with SegmentationClassAug when both
    are there."""
    root = voc_root(root)
    sets = root / "ImageSets" / "Segmentation"
    names, masks = [f"{split}.txt"], root / "SegmentationClass"
    if split == "train" and (root / "SegmentationClassAug").is_dir():
        augmented = [n for n in ("train_aug.txt", "aug.txt") if (sets / n).is_file()]
        if augmented:
            names, masks = augmented[:1], root / "SegmentationClassAug"
    ids_file = sets / names[0]
    if not ids_file.is_file():
        raise FileNotFoundError(f"VOC split file not found: {ids_file}")
    ids, seen = [], {}
    for number, line in enumerate(ids_file.read_text().splitlines(), 1):
        if line.strip():
            ids.append(line.split()[0])
            refuse_repeat(seen, ids[-1], number, ids_file, ids[-1])
    pairs = [(root / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in ids]
    for path in (p for pair in pairs for p in pair):
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in {ids_file}) not found")
    return pairs


def _scan_kitti(root: Path, split: str) -> list[Pair]:
    path = split_list_path(root, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"KITTI split list not found: {path} (KITTI's split, e.g. Eigen's, is a list: pass "
            "split_file or run `python -m evaluation.prepare kitti ROOT --train-list ... "
            "--val-list ...`)"
        )
    return read_split_list(path, root)


SCANNERS: dict[str, Callable[[Path, str], list[Pair]]] = {
    "nyuv2": _scan_nyuv2,
    "kitti": _scan_kitti,
    "ade20k": _scan_ade20k,
    "pascal": _scan_pascal,
    "loveda": _scan_loveda,
}


def scan_layout(name: str, root: str | Path, split: str) -> list[Pair]:
    """The (image, target) pairs of `split` ("train" | "val") found in the public layout of
    dataset `name` under `root`, sorted; errors name the missing folder or file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = require_dir(Path(root), "dataset root")
    return SCANNERS[get_info(name).name](root, split)


def missing_files(pairs: Iterable[Pair]) -> list[Path]:
    """The paths of `pairs` that are not files."""
    return [p for pair in pairs for p in pair if not p.is_file()]


def check_pairs(pairs: list[Pair], source: str | Path) -> None:
    """An empty split, or listed files that do not exist, are errors naming them."""
    if not pairs:
        raise ValueError(f"no (image, target) pairs in {source}")
    missing = missing_files(pairs)
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise FileNotFoundError(f"{len(missing)} files listed by {source} not found: {shown}")
