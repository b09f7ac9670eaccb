"""Tiny evaluation datasets in the real on-disk layouts, generated locally (no download).

    build_demo("ade20k", "data/eval_demo/ade20k")   # or: python -m evaluation.demo_data NAME ROOT

Each image is a scene of flat regions (a Voronoi partition, cells about `CELL` of the image's
short side), every region one *kind* out of a few: the kind fixes the region's colour and stripes
(`KIND_COLOURS`, `kind_texture`), its class and its depth. So the targets are learnable from a
frozen encoder's patch features, even a random-weight encoder's (a random ViT's patch tokens
still carry a patch's colour) and the `make demo` MAE's (which keeps texture better than colour):
a linear head trained for well under a minute on CPU reaches d1 > 50 % and mIoU > 20 %
(tests/evaluation/test_demo_learns.py), which shows that it learns.
- depth: per kind a constant (`KIND_DEPTH` x max_depth) times a gentle ramp (far at the top),
  16-bit png at the release's scale (NYUv2 mm, KITTI 1/256 m); NYUv2 has scattered 0 (invalid)
  pixels, KITTI is sparse like LiDAR. NYUv2 frames are always 480 x 640 (the Eigen crop needs them).
- masks: kind k -> the k-th label of the release's encoding: ADE20K grey png 0..150 (0 other),
  VOC palette png with 255 borders, LoveDA grey png 0..7 (0 no data). Every image holds every
  kind.
`DEMO.json` at the root (written last, with the build parameters) marks the folder as demo data:
runs on it are labelled demo (`demo: true` in results.json) and never compared with the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

NYU_SIZE = (480, 640)
SIZE_FACTORS = (1.0, 0.7, 1.35)  # with the default size: 240x320, 168x224, 324x432
# Raw label ids the kinds map to: ADE20K 0 = other; LoveDA 0 = no data; VOC 0 = background.
ADE_LABELS = (0, 5, 12, 150, 1, 77)
LOVEDA_LABELS = (0, 1, 2, 3, 4, 5, 6, 7)
VOC_LABELS = (0, 15, 7, 12, 20, 3)
KITTI_DRIVE = ("2011_09_26", "2011_09_26_drive_0001_sync")
# Colour of each kind of region (distinct hues, room above and below for the shading).
KIND_COLOURS = np.array(
    [[200, 60, 50], [60, 160, 70], [50, 90, 200], [220, 190, 60],
     [150, 70, 180], [60, 190, 200], [230, 130, 40], [140, 140, 140]], dtype=np.float64,
)  # fmt: skip
KIND_DEPTH = (0.1, 0.15, 0.22, 0.32, 0.45, 0.62)  # depth of each kind, as fractions of max_depth
CELL = 0.45  # region size (grid step of the Voronoi seeds) as a fraction of the short side
STRIPES = 0.2  # amplitude of each kind's stripes (kind_texture): +-20 % of the colour
KIND_PERIODS = (6.0, 11.0, 17.0)  # stripe periods in pixels, by kind
RAMP = 0.08  # depth is x (1 + RAMP) at the top row and x (1 - RAMP) at the bottom one
DEMO_VERSION = 2  # bump when the generated data change: older demo sets are rebuilt
MARKER = "DEMO.json"  # at a demo set's root, written last


def image_size(index: int, size: tuple[int, int]) -> tuple[int, int]:
    factor = SIZE_FACTORS[index % len(SIZE_FACTORS)]
    return round(size[0] * factor), round(size[1] * factor)


def region_kinds(shape: tuple[int, int], n_kinds: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) int64 kind per pixel: the Voronoi cells of seeds on a jittered grid (step CELL x
    the short side, at least 3 x 3), each cell one kind; every kind gets at least one cell."""
    h, w = shape
    step = CELL * min(h, w)
    gy, gx = max(3, round(h / step)), max(3, round(w / step))
    cy, cx = np.meshgrid((np.arange(gy) + 0.5) / gy, (np.arange(gx) + 0.5) / gx, indexing="ij")
    seeds = np.stack([cy.ravel() * h, cx.ravel() * w], axis=1)  # (n, 2) pixel centres
    seeds += rng.uniform(-0.35, 0.35, seeds.shape) * [h / gy, w / gx]
    n = len(seeds)
    kinds = rng.permutation(np.concatenate([np.arange(n_kinds), rng.integers(0, n_kinds, n - n_kinds)]))  # fmt: skip
    yy, xx = np.mgrid[:h, :w]
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2  # (H, W, n)
    return kinds[dist.argmin(axis=2)]


def kind_texture(kinds: np.ndarray) -> np.ndarray:
    """(H, W) in [-1, 1]: stripes of each kind's own orientation and period (KIND_PERIODS), so a
    region's kind shows in its texture as well as in its colour (an encoder trained with a
    per-patch normalised target, as Pixio's MAE, keeps texture better than absolute colour)."""
    h, w = kinds.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    angle = np.pi * kinds / len(KIND_COLOURS)
    period = np.asarray(KIND_PERIODS, dtype=np.float64)[kinds % len(KIND_PERIODS)]
    return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)


def scene(kinds: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: each region the colour of its kind, striped by its kind's texture."""
    shade = 1.0 + STRIPES * kind_texture(kinds)
    return np.clip(KIND_COLOURS[kinds] * shade[..., None], 0, 255).round().astype(np.uint8)


def depth_metres(kinds: np.ndarray, max_depth: float) -> np.ndarray:
    """(H, W) metres: the kind's depth, slightly further towards the top (a gentle ramp)."""
    h = kinds.shape[0]
    ramp = np.linspace(1.0 + RAMP, 1.0 - RAMP, h)[:, None]
    depth = max_depth * np.asarray(KIND_DEPTH)[kinds] * ramp
    return np.clip(depth, 0.02 * max_depth, 0.95 * max_depth)


def encode_depth(depth: np.ndarray, scale: float, keep: np.ndarray) -> Image.Image:
    """16-bit png of round(depth * scale), 0 where `keep` is False."""
    values = np.where(keep, np.rint(depth * scale), 0).astype(np.uint16)
    return Image.fromarray(values)


def kind_labels(kinds: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 mask: kind k -> labels[k]."""
    return np.asarray(labels, dtype=np.uint8)[kinds]


def voc_palette() -> list[int]:
    """The VOC colour map: bits of the class id spread over the high bits of R, G and B."""
    palette = []
    for index in range(256):
        rgb, c = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        palette += rgb
    return palette


def voc_mask(kinds: np.ndarray) -> Image.Image:
    """Palette png of class ids with 255 on object borders, as in SegmentationClass."""
    mask = kind_labels(kinds, VOC_LABELS)
    border = np.zeros(mask.shape, dtype=bool)
    border[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    border[1:, :] |= mask[1:, :] != mask[:-1, :]
    mask[border] = 255
    img = Image.fromarray(mask, mode="P")
    img.putpalette(voc_palette())
    return img


def save(img: Image.Image | np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(path)


@dataclass
class Scene:
    """One demo image and the kind of each of its pixels."""

    image: np.ndarray  # (H, W, 3) uint8
    kinds: np.ndarray  # (H, W) int64, 0..n_kinds-1


def make_scene(index: int, shape: tuple[int, int], n_kinds: int, seed: int) -> Scene:
    """Scene `index` of a build, its regions drawn from (seed, index)."""
    kinds = region_kinds(shape, n_kinds, np.random.default_rng([seed, index]))
    return Scene(scene(kinds), kinds)


Pair = tuple[Path, Path]
Writer = Callable[[Path, str, int, Scene], Pair]


def _write_nyuv2(root: Path, split: str, k: int, s: Scene) -> Pair:
    base = root / ("sync" if split == "train" else "official_splits/test")
    folder = base / ("bedroom_0001", "kitchen_0002")[k % 2]
    rgb, depth = folder / f"rgb_{k:05d}.jpg", folder / f"sync_depth_{k:05d}.png"
    h, w = s.kinds.shape
    yy, xx = np.mgrid[:h, :w]
    keep = ((yy * 7 + xx * 13) % 37 != 0) & (yy >= 20)  # scattered holes, a blank top band
    save(s.image, rgb)
    save(encode_depth(depth_metres(s.kinds, 10.0), 1000.0, keep), depth)
    return rgb, depth


def _write_kitti(root: Path, split: str, k: int, s: Scene) -> Pair:
    date, drive = KITTI_DRIVE
    drive = drive.replace("0001", "0001" if split == "train" else "0002")
    rgb = root / "images" / date / drive / "image_02" / "data" / f"{k:010d}.png"
    depth = root / "annotations" / drive / "proj_depth" / "groundtruth" / "image_02" / rgb.name
    h, w = s.kinds.shape
    yy, xx = np.mgrid[:h, :w]
    keep = (yy >= 0.35 * h) & ((yy * 31 + xx * 17) % 5 == 0)  # sparse, nothing in the sky
    save(s.image, rgb)
    save(encode_depth(depth_metres(s.kinds, 80.0), 256.0, keep), depth)
    return rgb, depth


def _write_ade20k(root: Path, split: str, k: int, s: Scene) -> Pair:
    folder, prefix = ("training", "train") if split == "train" else ("validation", "val")
    stem = f"ADE_{prefix}_{k + 1:08d}"
    rgb, mask = (
        root / "images" / folder / f"{stem}.jpg",
        root / "annotations" / folder / f"{stem}.png",
    )
    save(s.image, rgb)
    save(kind_labels(s.kinds, ADE_LABELS), mask)
    return rgb, mask


def _write_pascal(root: Path, split: str, k: int, s: Scene) -> Pair:
    stem = f"{2007 if split == 'train' else 2008}_{k:06d}"
    rgb, mask = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
    save(s.image, rgb)
    save(voc_mask(s.kinds), mask)
    return rgb, mask


def _write_loveda(root: Path, split: str, k: int, s: Scene) -> Pair:
    top = "Train" if split == "train" else "Val"
    domain = root / top / top / ("Rural", "Urban")[k % 2]
    name = f"{k if split == 'train' else 2522 + k}.png"
    rgb, mask = domain / "images_png" / name, domain / "masks_png" / name
    save(s.image, rgb)
    save(kind_labels(s.kinds, LOVEDA_LABELS), mask)
    return rgb, mask


WRITERS: dict[str, Writer] = {
    "nyuv2": _write_nyuv2,
    "kitti": _write_kitti,
    "ade20k": _write_ade20k,
    "pascal": _write_pascal,
    "loveda": _write_loveda,
}
# Kinds of region per dataset: the depth kinds, or one per label of the release's encoding.
N_KINDS = {"nyuv2": len(KIND_DEPTH), "kitti": len(KIND_DEPTH), "ade20k": len(ADE_LABELS),
           "pascal": len(VOC_LABELS), "loveda": len(LOVEDA_LABELS)}  # fmt: skip


def build_demo(
    name: str,
    root: str | Path,
    n_train: int = 8,
    n_val: int = 3,
    size: tuple[int, int] = (240, 320),
    *,
    seed: int = 0,
    sbd_aug: bool = False,
) -> Path:
    """Write a tiny `name` dataset (nyuv2, kitti, ade20k, pascal, loveda) in its release layout
    under `root` (absent or empty) and return it (the path to give `build_dataset`). KITTI gets
    the lists `splits/{train,val}.txt` (its split is a list); VOC gets `ImageSets/Segmentation`,
    and with `sbd_aug` an SBD-style `SegmentationClassAug` + `train_aug.txt` with two extra
    images. `DEMO.json` (the parameters) is written last."""
    from evaluation.datasets import get_info

    key, root = get_info(name).name, Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"demo dataset root is not empty: {root}")
    # Built beside the root and moved in at the end, so an interrupted build leaves no half set.
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    _build(key, partial, n_train, n_val, size, seed, sbd_aug)
    write_marker(partial, key, train=n_train, val=n_val, size=list(size), seed=seed, sbd_aug=sbd_aug)  # fmt: skip
    if root.exists():
        root.rmdir()
    os.replace(partial, root)
    return root


def _build(
    key: str, root: Path, n_train: int, n_val: int, size: tuple[int, int], seed: int, sbd_aug: bool
) -> None:
    pairs: dict[str, list[Pair]] = {}
    scenes: dict[str, list[Scene]] = {}
    for offset, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        pairs[split], scenes[split] = [], []
        for k in range(count):
            shape = NYU_SIZE if key == "nyuv2" else image_size(k, size)
            s = make_scene(offset * 1000 + k, shape, N_KINDS[key], seed)
            pairs[split].append(WRITERS[key](root, split, k, s))
            scenes[split].append(s)
    if key == "kitti":
        for split, found in pairs.items():
            _write_plain_list(root / "splits" / f"{split}.txt", root, found)
    if key == "pascal":
        _write_voc_sets(root, pairs, scenes["train"], size, seed, sbd_aug)


def _write_plain_list(path: Path, root: Path, pairs: list[Pair]) -> None:
    """A user's list in the reference's format: "image target" relative to the root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{i.relative_to(root).as_posix()} {t.relative_to(root).as_posix()}" for i, t in pairs]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _write_voc_sets(
    root: Path,
    pairs: dict[str, list[Pair]],
    train: list[Scene],
    size: tuple[int, int],
    seed: int,
    sbd_aug: bool,
) -> None:
    """ImageSets/Segmentation/{train,val,trainval}.txt; with `sbd_aug`, grey SBD-style masks of
    the train images plus two images only SBD has, listed in train_aug.txt."""
    ids = {split: [image.stem for image, _ in found] for split, found in pairs.items()}
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, names in (*ids.items(), ("trainval", ids["train"] + ids["val"])):
        (sets / f"{split}.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    if not sbd_aug:
        return
    aug = list(zip(ids["train"], train, strict=True))
    for k in range(2):
        s = make_scene(2000 + k, image_size(k, size), len(VOC_LABELS), seed)
        save(s.image, root / "JPEGImages" / f"2011_{k:06d}.jpg")
        aug.append((f"2011_{k:06d}", s))
    for stem, s in aug:
        save(kind_labels(s.kinds, VOC_LABELS), root / "SegmentationClassAug" / f"{stem}.png")
    (sets / "train_aug.txt").write_text("".join(n + "\n" for n, _ in aug), encoding="utf-8")


# ---- the marker ---------------------------------------------------------------------------------
def write_marker(root: str | Path, dataset: str, **params: Any) -> Path:
    """`root/DEMO.json`: what was built (the dataset's layout, this module's DEMO_VERSION, the
    parameters). Written last, atomically: a root holding it is a complete demo set."""
    from pixio.runtime.atomic import write_text_atomic

    record = {"demo": True, "dataset": dataset, "version": DEMO_VERSION, **params}
    return write_text_atomic(Path(root) / MARKER, json.dumps(record, indent=2) + "\n")


def read_marker(root: str | Path) -> dict[str, Any] | None:
    """The DEMO.json record of a demo set at `root`; None when the folder holds none (real data,
    or nothing yet). A marker that cannot be read counts as none."""
    try:
        record = json.loads((Path(root) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("demo") is True else None


def is_demo_root(root: str | Path) -> bool:
    """Whether `root` holds demo data (a DEMO.json marker): results on it are labelled demo."""
    return read_marker(root) is not None


def demo_root_problem(root: str | Path) -> str | None:
    """Why `root` cannot take a demo set (None: it can). An absent or empty folder is built, a
    demo set (DEMO.json) is used (or rebuilt, when of an older DEMO_VERSION); anything else,
    a demo set of an earlier release included (they had no marker), is refused: it would be
    used as demo data or overwritten."""
    root = Path(root)
    if not root.is_dir() or not any(root.iterdir()) or is_demo_root(root):
        return None
    return (f"{root} is not empty and holds no {MARKER}: a demo set built by an earlier version "
            f"(delete the folder, the demo rebuilds it) or real data (set data.build_demo=false, "
            f"or give the demo another data.root)")  # fmt: skip


def ensure_demo(name: str, root: str | Path, n_train: int, n_val: int) -> Path:
    """The demo set of `name` at `root`: used as is when it is this version's with these counts,
    else (re)built. Refuses a folder `demo_root_problem` names (FileExistsError)."""
    root = Path(root)
    if (problem := demo_root_problem(root)) is not None:
        raise FileExistsError(problem)
    marker = read_marker(root)
    wanted = {"version": DEMO_VERSION, "train": n_train, "val": n_val}
    if marker is not None and all(marker.get(k) == v for k, v in wanted.items()):
        return root
    if marker is not None:  # ours, of another version or size: replaced
        shutil.rmtree(root)
    return build_demo(name, root, n_train, n_val)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m evaluation.demo_data NAME ROOT [--train N] [--val N]`."""
    parser = argparse.ArgumentParser(description="Write a tiny evaluation dataset.")
    parser.add_argument("name", choices=sorted(WRITERS))
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--val", type=int, default=3)
    parser.add_argument("--sbd-aug", action="store_true", help="pascal: add SBD-style lists")
    args = parser.parse_args(argv)
    print(build_demo(args.name, args.root, args.train, args.val, sbd_aug=args.sbd_aug))


if __name__ == "__main__":
    main()
