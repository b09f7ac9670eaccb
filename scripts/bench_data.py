"""Per-worker throughput of the Pixio pre-training stream: reduced-size vs full-size JPEG decode.

    .venv/bin/python scripts/bench_data.py [--images 120] [--size 256] [--rounds 3]

Writes web-format shards of 1-2 megapixel photo-like JPEGs (scikit-image / scikit-learn sample
photos, randomly cropped, upscaled and given sensor-like noise) to a temporary directory, then
runs the real `build_pretrain_dataset` stream in one process (= one DataLoader worker) twice per
round: `reduced_decode=False` (full-size decode, then RandomResizedCrop) and the default reduced
decode. Also times a plain torchvision RandomResizedCrop on full decodes of the same bytes.
Prints one JSON object with images/s for each and the ratios (best of rounds). The full-decode
stream uses the same crop boxes as the reduced one, so the ratio isolates decode + resize.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.data import build_pretrain_dataset


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


def write_shards(root: Path, n_images: int, shard_size: int, seed: int = 0) -> list[bytes]:
    """Web-format shards under root/bench/; returns the JPEG bytes written."""
    rng = np.random.default_rng(seed)
    photos = source_photos()
    images = [photo_like_jpeg(photos[i % len(photos)], rng) for i in range(n_images)]
    (root / "bench").mkdir(parents=True)
    for start in range(0, n_images, shard_size):
        with wds.TarWriter(str(root / "bench" / f"bench-{start // shard_size:04d}.tar")) as tar:
            for i in range(start, min(start + shard_size, n_images)):
                tar.write({"__key__": f"{i:06d}", "jpeg": images[i]})
    return images


def time_stream(root: Path, size: int, reduced: bool) -> float:
    """Images per second through one pass of the real stream in this process."""
    ds = build_pretrain_dataset(
        root, kind="web", input_size=size, passes=1, shuffle_buffer=0, reduced_decode=reduced
    )
    start, count = time.perf_counter(), 0
    for _ in ds:
        count += 1
    return count / (time.perf_counter() - start)


def time_torchvision(images: list[bytes], size: int) -> float:
    """Images per second of PIL full decode + torchvision RandomResizedCrop/ToTensor/Normalize."""
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    start = time.perf_counter()
    for data in images:
        tf(Image.open(io.BytesIO(data)).convert("RGB"))
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--shard-size", type=int, default=30)
    parser.add_argument("--size", type=int, default=256, help="crop size S")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many passes each")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    with tempfile.TemporaryDirectory(prefix="pixio-bench-") as tmp:
        root = Path(tmp)
        images = write_shards(root, args.images, args.shard_size)
        full, reduced, tv = [], [], []
        for _ in range(args.rounds):  # interleaved so background load hits all alike
            full.append(time_stream(root, args.size, reduced=False))
            reduced.append(time_stream(root, args.size, reduced=True))
            tv.append(time_torchvision(images, args.size))
    mp = [np.prod(Image.open(io.BytesIO(b)).size) / 1e6 for b in images]
    result = {
        "images": args.images,
        "crop_size": args.size,
        "megapixels_min_mean_max": [round(min(mp), 2), round(float(np.mean(mp)), 2), round(max(mp), 2)],
        "jpeg_kb_mean": round(float(np.mean([len(b) for b in images])) / 1024, 1),
        "full_decode_img_per_s": round(max(full), 1),
        "reduced_decode_img_per_s": round(max(reduced), 1),
        "torchvision_full_decode_img_per_s": round(max(tv), 1),
        "ratio_reduced_over_full": round(max(reduced) / max(full), 2),
        "ratio_reduced_over_torchvision": round(max(reduced) / max(tv), 2),
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
