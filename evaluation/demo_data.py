"""Tiny evaluation datasets in the real on-disk layouts, built locally from the demo images.

    build_demo("ade20k", "data/eval_demo/ade20k")   # or: python -m evaluation.demo_data NAME ROOT

Images come from `pixio.data.demo` (bundled with scikit-image / scikit-learn, no download), resized
to a few non-square sizes around `size` (some under 256 on both sides, some over). Targets are
smooth functions of the image so a head can learn something:
- depth: distance growing towards the top and with brightness, 16-bit png at the release's scale
  (NYUv2 mm, KITTI 1/256 m); NYUv2 has scattered 0 (invalid) pixels, KITTI is sparse like LiDAR.
  NYUv2 frames are always 480 x 640 (the Eigen crop needs them).
- masks: colour/position bins mapped to the release's encoding: ADE20K grey png 0..150 (0 other),
  VOC palette png with 255 borders, LoveDA grey png 0..7 (0 no data).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

NYU_SIZE = (480, 640)
SIZE_FACTORS = (1.0, 0.7, 1.35)  # with the default size: 240x320, 168x224, 324x432
# Raw label ids the mask bins map to: ADE20K 0 = other; LoveDA 0 = no data; VOC 0 = background.
ADE_LABELS = (0, 5, 12, 150, 1, 77)
LOVEDA_LABELS = (0, 1, 2, 3, 4, 5, 6, 7)
VOC_LABELS = (0, 15, 7, 12, 20, 3)
KITTI_DRIVE = ("2011_09_26", "2011_09_26_drive_0001_sync")


def demo_image(index: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: demo sample `index` resized to `size` = (H, W)."""
    from pixio.data.demo import demo_jpeg  # heavy import (webdataset), only when building

    with Image.open(io.BytesIO(demo_jpeg(index, seed))) as img:
        rgb = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def image_size(index: int, size: tuple[int, int]) -> tuple[int, int]:
    factor = SIZE_FACTORS[index % len(SIZE_FACTORS)]
    return round(size[0] * factor), round(size[1] * factor)


def depth_metres(image: np.ndarray, max_depth: float) -> np.ndarray:
    """A plausible depth map: far at the top, nearer at the bottom, brighter = further."""
    h, w = image.shape[:2]
    rows = np.linspace(1.0, 0.0, h)[:, None]
    cols = np.linspace(0.0, np.pi, w)[None, :]
    grey = image.mean(axis=2) / 255.0
    depth = max_depth * (0.1 + 0.55 * rows + 0.2 * grey) * (0.9 + 0.1 * np.sin(cols))
    return np.clip(depth, 0.02 * max_depth, 0.95 * max_depth)


def encode_depth(depth: np.ndarray, scale: float, keep: np.ndarray) -> Image.Image:
    """16-bit png of round(depth * scale), 0 where `keep` is False."""
    values = np.where(keep, np.rint(depth * scale), 0).astype(np.uint16)
    return Image.fromarray(values)


def label_bins(image: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Bins of (column + brightness) mod 1 -> `labels`; every row sweeps all bins, so each mask
    holds every label."""
    h, w = image.shape[:2]
    cols = np.linspace(0.0, 1.0, w, endpoint=False)[None, :]
    mixed = (cols + 0.3 * image.mean(axis=2) / 255.0) % 1.0
    bins = np.minimum((mixed * len(labels)).astype(np.int64), len(labels) - 1)
    return np.asarray(labels, dtype=np.uint8)[bins]


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


def voc_mask(image: np.ndarray) -> Image.Image:
    """Palette png of class ids with 255 on object borders, as in SegmentationClass."""
    mask = label_bins(image, VOC_LABELS)
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


Pair = tuple[Path, Path]
Writer = Callable[[Path, str, int, np.ndarray], Pair]


def _write_nyuv2(root: Path, split: str, k: int, image: np.ndarray) -> Pair:
    base = root / ("sync" if split == "train" else "official_splits/test")
    scene = base / ("bedroom_0001", "kitchen_0002")[k % 2]
    rgb, depth = scene / f"rgb_{k:05d}.jpg", scene / f"sync_depth_{k:05d}.png"
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    keep = ((yy * 7 + xx * 13) % 37 != 0) & (yy >= 20)  # scattered holes, a blank top band
    save(Image.fromarray(image), rgb)
    save(encode_depth(depth_metres(image, 10.0), 1000.0, keep), depth)
    return rgb, depth


def _write_kitti(root: Path, split: str, k: int, image: np.ndarray) -> Pair:
    date, drive = KITTI_DRIVE
    drive = drive.replace("0001", "0001" if split == "train" else "0002")
    rgb = root / "images" / date / drive / "image_02" / "data" / f"{k:010d}.png"
    depth = root / "annotations" / drive / "proj_depth" / "groundtruth" / "image_02" / rgb.name
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    keep = (yy >= 0.35 * h) & ((yy * 31 + xx * 17) % 5 == 0)  # sparse, nothing in the sky
    save(image, rgb)
    save(encode_depth(depth_metres(image, 80.0), 256.0, keep), depth)
    return rgb, depth


def _write_ade20k(root: Path, split: str, k: int, image: np.ndarray) -> Pair:
    folder, prefix = ("training", "train") if split == "train" else ("validation", "val")
    stem = f"ADE_{prefix}_{k + 1:08d}"
    rgb, mask = (
        root / "images" / folder / f"{stem}.jpg",
        root / "annotations" / folder / f"{stem}.png",
    )
    save(image, rgb)
    save(label_bins(image, ADE_LABELS), mask)
    return rgb, mask


def _write_pascal(root: Path, split: str, k: int, image: np.ndarray) -> Pair:
    stem = f"{2007 if split == 'train' else 2008}_{k:06d}"
    rgb, mask = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
    save(image, rgb)
    save(voc_mask(image), mask)
    return rgb, mask


def _write_loveda(root: Path, split: str, k: int, image: np.ndarray) -> Pair:
    top = "Train" if split == "train" else "Val"
    domain = root / top / top / ("Rural", "Urban")[k % 2]
    name = f"{k if split == 'train' else 2522 + k}.png"
    rgb, mask = domain / "images_png" / name, domain / "masks_png" / name
    save(image, rgb)
    save(label_bins(image, LOVEDA_LABELS), mask)
    return rgb, mask


WRITERS: dict[str, Writer] = {
    "nyuv2": _write_nyuv2,
    "kitti": _write_kitti,
    "ade20k": _write_ade20k,
    "pascal": _write_pascal,
    "loveda": _write_loveda,
}


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
    under `root` (absent or empty) and return it (the path to give `build_dataset`). KITTI gets the lists
    `splits/{train,val}.txt` (its split is a list); VOC gets `ImageSets/Segmentation`, and with
    `sbd_aug` an SBD-style `SegmentationClassAug` + `train_aug.txt` with two extra images."""
    from evaluation.datasets import get_info

    key, root = get_info(name).name, Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"demo dataset root is not empty: {root}")
    # Built beside the root and moved in at the end, so an interrupted build leaves no half set.
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    _build(key, partial, n_train, n_val, size, seed, sbd_aug)
    if root.exists():
        root.rmdir()
    os.replace(partial, root)
    return root


def _build(
    key: str, root: Path, n_train: int, n_val: int, size: tuple[int, int], seed: int, sbd_aug: bool
) -> None:
    pairs: dict[str, list[Pair]] = {}
    for offset, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        pairs[split] = []
        for k in range(count):
            shape = NYU_SIZE if key == "nyuv2" else image_size(k, size)
            image = demo_image(offset * 1000 + k, shape, seed)
            pairs[split].append(WRITERS[key](root, split, k, image))
    if key == "kitti":
        for split, found in pairs.items():
            _write_plain_list(root / "splits" / f"{split}.txt", root, found)
    if key == "pascal":
        _write_voc_sets(root, pairs, size, seed, sbd_aug)


def _write_plain_list(path: Path, root: Path, pairs: list[Pair]) -> None:
    """A user's list in the reference's format: "image target" relative to the root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{i.relative_to(root).as_posix()} {t.relative_to(root).as_posix()}" for i, t in pairs]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _write_voc_sets(
    root: Path, pairs: dict[str, list[Pair]], size: tuple[int, int], seed: int, sbd_aug: bool
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
    aug = list(ids["train"])
    for k in range(2):
        stem = f"2011_{k:06d}"
        save(demo_image(2000 + k, image_size(k, size), seed), root / "JPEGImages" / f"{stem}.jpg")
        aug.append(stem)
    for stem in aug:
        with Image.open(root / "JPEGImages" / f"{stem}.jpg") as img:
            grey = label_bins(np.asarray(img.convert("RGB")), VOC_LABELS)
        save(grey, root / "SegmentationClassAug" / f"{stem}.png")
    (sets / "train_aug.txt").write_text("".join(n + "\n" for n in aug), encoding="utf-8")


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
