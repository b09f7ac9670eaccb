"""Per-worker throughput and memory: the reference loader vs the default Pixio stream.

    .venv/bin/python scripts/bench_data.py [--distinct 160] [--samples 8000] [--fresh 300]
        [--total 4000] [--repeats 3] [--size 256]

Writes web-format shards of 1-2 megapixel photo-like JPEGs (scikit-image / scikit-learn sample
photos, randomly cropped, upscaled and given sensor-like noise; `--distinct` different images
repeated under distinct keys up to `--samples`) to a temporary directory. Then, per repeat and
interleaved, runs each loader in a fresh single-threaded process (= one DataLoader worker):

- reference: webdataset tar reader -> `wds.shuffle(10000)` of the raw samples -> PIL full decode
  -> torchvision RandomResizedCrop(S, (0.2, 1), bicubic) / ToTensor / Normalize (the reference
  recipe's loader);
- pixio: `build_pretrain_dataset` with the default settings through `EpochLoader` with
  num_workers=0 (the in-process path of a worker): encoded shuffle buffer (10,000 samples /
  1024 MiB), 8 interleaved shards, one reduced-size decode per image.

Each process reports images/s of the fresh stream (first `--fresh` images, buffer fill
included) and of the steady state (images `--fresh` to `--total`; by then the pixio buffer has
reached its 1 GiB bound), both per wall-clock second and per CPU second of the process (robust
on a shared machine), and its peak RSS. Prints one JSON object with the medians over repeats,
the ratios of the medians and every run.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.data import build_pretrain_dataset
from pixio.runtime.loader import EpochLoader

BATCH = 20  # images per batch in both loaders (the fresh phase ends on a batch boundary)


def source_photos() -> list[np.ndarray]:
    """Colour photographs shipped inside scikit-image and scikit-learn."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    photos = [sk.astronaut(), sk.coffee(), sk.chelsea(), sk.rocket(), sk.immunohistochemistry()]
    return photos + list(load_sample_images().images)


def photo_like_jpeg(src: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 1-2 MP JPEG: random crop of a photo, bicubic upscale, Gaussian noise, quality 90."""
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(src[top : top + ch, left : left + cw])
    factor = (rng.uniform(1.0e6, 2.0e6) / (ch * cw)) ** 0.5
    big = np.asarray(crop.resize((round(cw * factor), round(ch * factor)), Image.BICUBIC))
    noisy = np.clip(big + rng.normal(0.0, 4.0, big.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, distinct: int, samples: int, shard_size: int = 200) -> list[bytes]:
    """Web-format shards under root/bench/ (distinct images repeated); returns the distinct ones."""
    rng = np.random.default_rng(0)
    photos = source_photos()
    images = [photo_like_jpeg(photos[i % len(photos)], rng) for i in range(distinct)]
    (root / "bench").mkdir(parents=True)
    for start in range(0, samples, shard_size):
        with wds.TarWriter(str(root / "bench" / f"bench-{start // shard_size:04d}.tar")) as tar:
            for i in range(start, min(start + shard_size, samples)):
                tar.write({"__key__": f"{i:06d}", "jpeg": images[int(rng.integers(distinct))]})
    return images


# ---- the loaders (run inside a child process) ---------------------------------------------------
def reference_batches(root: Path, size: int) -> Iterator[torch.Tensor]:
    """webdataset + shuffle(10000) of raw samples + full decode + torchvision transforms."""
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    urls = sorted(str(p) for p in (root / "bench").glob("*.tar"))
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=0, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(10000, seed=0),
        wds.map(lambda s: tf(Image.open(io.BytesIO(s["jpeg"])).convert("RGB"))),
        wds.batched(BATCH, collation_fn=torch.stack),
    )
    return iter(pipeline)


def pixio_batches(root: Path, size: int) -> Iterator[torch.Tensor]:
    """The default stream through the loader's in-process path."""
    ds = build_pretrain_dataset(root, kind="web", input_size=size, rank=0, world_size=1)
    return EpochLoader(ds, BATCH, 0, seed=0, iters_per_epoch=1605).iterate(0)


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, root: Path, size: int, fresh: int, total: int) -> dict[str, float]:
    """Time one loader in this process: fresh phase, steady phase (wall clock and CPU time of
    this process, which other jobs on the machine do not inflate), peak RSS. Everything is
    imported before the clocks start."""
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    make = reference_batches if kind == "reference" else pixio_batches
    base = rss_mib()
    clocks = [(time.perf_counter(), time.process_time())]
    batches, seen, n_fresh = make(root, size), 0, 0
    for batch in batches:
        seen += len(batch)
        if seen >= fresh and not n_fresh:
            clocks.append((time.perf_counter(), time.process_time()))
            n_fresh = seen
        if seen >= total:
            break
    clocks.append((time.perf_counter(), time.process_time()))
    (w0, c0), (w1, c1), (w2, c2) = clocks
    return {
        "fresh_img_per_s": n_fresh / (w1 - w0),
        "steady_img_per_s": (seen - n_fresh) / (w2 - w1),
        "fresh_img_per_cpu_s": n_fresh / (c1 - c0),
        "steady_img_per_cpu_s": (seen - n_fresh) / (c2 - c1),
        "peak_rss_mib": rss_mib(),
        "rss_before_stream_mib": base,
    }


# ---- the driver --------------------------------------------------------------------------------
def run_child(kind: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root)]
    cmd += ["--size", str(args.size), "--fresh", str(args.fresh), "--total", str(args.total)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, object]:
    """Medians per loader and metric, plus the pixio / reference ratios of the medians."""
    med = {
        kind: {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]}
        for kind, rs in runs.items()
    }
    rates = [k for k in med["pixio"] if "_img_per_" in k]
    ratios = {f"ratio_{k}": round(med["pixio"][k] / med["reference"][k], 2) for k in rates}
    raw = {kind: [[round(r[k], 1) for k in rates] for r in rs] for kind, rs in runs.items()}
    return {"median": med, "ratios": ratios, "runs": {"columns": rates, **raw}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distinct", type=int, default=160, help="different JPEGs generated")
    parser.add_argument("--samples", type=int, default=8000, help="samples written to the tars")
    parser.add_argument("--fresh", type=int, default=300, help="images of the fresh phase")
    parser.add_argument("--total", type=int, default=4000, help="images per run (fresh + steady)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="crop size S")
    parser.add_argument("--child", choices=["reference", "pixio"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.size, args.fresh, args.total)))
        return
    with tempfile.TemporaryDirectory(prefix="pixio-bench-") as tmp:
        images = write_shards(Path(tmp), args.distinct, args.samples)
        runs: dict[str, list[dict[str, float]]] = {"reference": [], "pixio": []}
        for _ in range(args.repeats):  # interleaved so background load hits both alike
            for kind in runs:
                runs[kind].append(run_child(kind, Path(tmp), args))
    mp = [np.prod(Image.open(io.BytesIO(b)).size) / 1e6 for b in images]
    result = {
        "samples": args.samples, "crop_size": args.size, "fresh_images": args.fresh,
        "total_images": args.total, "repeats": args.repeats,
        "megapixels_min_mean_max": [round(min(mp), 2), round(float(np.mean(mp)), 2), round(max(mp), 2)],
        "jpeg_kb_mean": round(float(np.mean([len(b) for b in images])) / 1024, 1),
        **summarise(runs),
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
