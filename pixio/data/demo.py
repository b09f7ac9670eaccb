"""The built-in demo set: web-format shards made from images bundled with scikit-image and
scikit-learn (no download), with curation statistics.

    python -m pixio.data.demo [--out data/demo] [--samples 3000] [--shard-size 250] \
        [--workers 2] [--force]

Layout: `<out>/shards/part-{a,b}/demo-NNN.tar` and `<out>/json/part-{a,b}/demo-NNN.json`;
`<out>/.complete` (the build parameters) is written last. See docs/data.md, "Demo set".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from pixio.data.curate import curate_shard
from pixio.data.images import draw_crop_box, to_rgb

log = logging.getLogger("pixio.data")

DEMO_VERSION = 1  # bump when the generated images change, so old sets are rebuilt
JPEG_QUALITY = 88
SHORT_SIDE = (144, 288)
CROP_SCALE = (0.25, 1.0)
PHOTO_WEIGHT = 1.5  # photos are drawn more often than the low-entropy graphics
# What a build writes under its root (see `ensure_demo_data`); `.complete` comes last.
DEMO_ENTRIES = frozenset({"shards", "json", ".build", ".lock", ".complete"})


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


def _cup_on_white() -> np.ndarray:
    """A product shot: a small crop around the coffee cup pasted on a white canvas."""
    import skimage.data

    cup = Image.fromarray(skimage.data.coffee()[20:380, 110:470]).resize((200, 200))
    canvas = Image.new("RGB", (600, 400), (255, 255, 255))
    canvas.paste(cup, (200, 100))
    return np.asarray(canvas)


# name -> (loader, draw weight). Greyscale sources stay greyscale.
SOURCES: dict[str, tuple[Callable[[], np.ndarray], float]] = {
    "sklearn_china": (_sklearn(0), PHOTO_WEIGHT),
    "sklearn_flower": (_sklearn(1), PHOTO_WEIGHT),
    **{
        name: (_skimage(name), PHOTO_WEIGHT)
        for name in (
            "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "coins", "page",
            "grass", "camera", "text", "clock", "retina", "colorwheel", "brick",
            "hubble_deep_field", "cell", "moon", "logo",
        )
    },
    "cup_on_white": (_cup_on_white, 1.0),
    "checkerboard": (_skimage("checkerboard"), 1.0),
    "shepp_logan_phantom": (_skimage("shepp_logan_phantom"), 1.0),
    "horse": (_skimage("horse"), 1.0),
}  # fmt: skip


def as_uint8_image(arr: np.ndarray) -> Image.Image:
    """Bool / float / uint8 arrays -> L or RGB image (RGBA composited onto white)."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    img = Image.fromarray(arr.astype(np.uint8))
    return img if img.mode == "L" else to_rgb(img)


@functools.cache
def source_images() -> tuple[list[str], list[Image.Image], np.ndarray]:
    """Names, images and draw probabilities of the sources (loaded once per process)."""
    names = list(SOURCES)
    images = [as_uint8_image(np.asarray(SOURCES[n][0]())) for n in names]
    weights = np.asarray([SOURCES[n][1] for n in names], dtype=np.float64)
    return names, images, weights / weights.sum()


def demo_jpeg(index: int, seed: int = 0) -> bytes:
    """Sample `index`: a random crop (25-100 % area, aspect 3/4-4/3) of a random source, flipped
    with probability 1/2, shorter side 144-288 px, JPEG quality 88."""
    rng = np.random.default_rng([seed, index])
    _, images, probs = source_images()
    img = images[int(rng.choice(len(images), p=probs))]
    left, top, right, bottom = draw_crop_box(img.width, img.height, rng, CROP_SCALE)
    crop = img.crop((left, top, right, bottom))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    factor = short / min(crop.size)
    size = (max(1, round(crop.width * factor)), max(1, round(crop.height * factor)))
    buf = io.BytesIO()
    crop.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def shard_part(index: int, n_shards: int) -> str:
    """First half of the shards in part-a, the rest in part-b."""
    return "part-a" if index < (n_shards + 1) // 2 else "part-b"


def build_shard(job: tuple[Path, int, int, int, int, int]) -> int:
    """Write shard `index` (samples [start, stop)) and its statistics; returns the sample count."""
    build_dir, index, n_shards, start, stop, seed = job
    part = shard_part(index, n_shards)
    tar = build_dir / "shards" / part / f"demo-{index:03d}.tar"
    tar.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(tar)) as writer:
        for i in range(start, stop):
            writer.write({"__key__": f"{i:06d}", "jpeg": demo_jpeg(i, seed)})
    result = curate_shard(tar, build_dir / "json" / part / f"demo-{index:03d}.json")
    return result.images


def build(build_dir: Path, samples: int, shard_size: int, workers: int, seed: int) -> None:
    """Write all shards and statistics under `build_dir` with `workers` processes."""
    n_shards = -(-samples // shard_size)
    jobs = [
        (build_dir, k, n_shards, k * shard_size, min(samples, (k + 1) * shard_size), seed)
        for k in range(n_shards)
    ]
    source_images()  # loaded once here (spawned workers load their own copy)
    if workers <= 1:
        counts = [build_shard(job) for job in jobs]
    else:
        # Not fork: the builder often runs inside a training process whose threads (gloo, torch,
        # logging) may hold locks at fork time, which then never open in the child.
        with mp.get_context("spawn").Pool(min(workers, n_shards)) as pool:
            counts = pool.map(build_shard, jobs, chunksize=1)
    if sum(counts) != samples:
        raise RuntimeError(f"demo build wrote statistics for {sum(counts)} of {samples} samples")


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise concurrent builders (several ranks) on a lock file."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # no flock (not POSIX): a single builder is assumed
            pass
        yield


def read_marker(path: Path) -> dict[str, Any] | None:
    """The parameters recorded by a complete build, or None."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_demo_root(root: str | Path) -> bool:
    """Whether the existing folder `root` holds a demo set: a complete build, or only what an
    unfinished one writes (its `.lock` first). Anything else there is someone else's data."""
    root = Path(root)
    if (root / ".complete").is_file():
        return True
    names = {p.name for p in root.iterdir()}
    return ".lock" in names and names <= DEMO_ENTRIES


def ensure_demo_data(
    root: str | Path = "data/demo",
    samples: int = 3000,
    shard_size: int = 250,
    workers: int = 2,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Build the demo set under `root` unless a complete one with these parameters is there.

    Returns {"shards", "json_root", "n_samples", "n_shards", "built", "seconds"}.
    """
    root = Path(root)
    params = {"version": DEMO_VERSION, "samples": samples, "shard_size": shard_size, "seed": seed}
    result = {
        "shards": str(root / "shards"),
        "json_root": str(root / "json"),
        "n_samples": samples,
        "n_shards": -(-samples // shard_size),
        "built": False,
        "seconds": 0.0,
    }
    marker = root / ".complete"
    if not force and read_marker(marker) == params:
        return result
    start = time.perf_counter()
    with exclusive(root / ".lock"):
        if not force and read_marker(marker) == params:  # another rank built it meanwhile
            return result
        _rebuild(root, params, workers)
    result.update(built=True, seconds=round(time.perf_counter() - start, 2))
    log.info(
        "demo set: %d samples in %d shards under %s (%.1f s)",
        samples,
        result["n_shards"],
        root,
        result["seconds"],
    )
    return result


def _rebuild(root: Path, params: dict[str, Any], workers: int) -> None:
    """Build in `<root>/.build`, move into place, then write `.complete`."""
    (root / ".complete").unlink(missing_ok=True)
    build_dir = root / ".build"
    shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True)
    build(build_dir, params["samples"], params["shard_size"], workers, params["seed"])
    for name in ("shards", "json"):
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(build_dir / name, root / name)
    shutil.rmtree(build_dir, ignore_errors=True)
    (root / ".complete").write_text(json.dumps(params), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pixio.data.demo ...`: build (or find) the demo set and print its paths."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="Build the built-in demo shards.")
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.shard_size < 1:
        parser.error("--samples and --shard-size must be >= 1")
    paths = ensure_demo_data(
        args.out, args.samples, args.shard_size, args.workers, force=args.force
    )
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
