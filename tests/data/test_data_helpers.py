"""Helpers shared by the data tests: small images, shards written with webdataset's TarWriter,
statistics files, and readers of finite streams. Holds no tests itself."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tests_helpers import write_tar
from torch.utils.data import DataLoader


def image_bytes(
    w: int = 48, h: int = 40, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG"
) -> bytes:
    """A smooth random image (gradient + noise) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1) + yy * 127 // max(h - 1, 1)) % 256
    arr = np.clip(base[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def web_shards(
    root: Path, n_shards: int, per_shard: int, part: str = "a", ext: str = "jpeg"
) -> dict[str, list[str]]:
    """`root/<part>/s{i}.tar` with `per_shard` images each; returns shard path -> member names."""
    members: dict[str, list[str]] = {}
    for s in range(n_shards):
        keys = [f"{s:02d}{i:04d}" for i in range(per_shard)]
        path = write_tar(
            root / part / f"s{s}.tar",
            [{"__key__": k, ext: image_bytes(seed=int(k))} for k in keys],
        )
        members[str(path)] = [f"{k}.{ext}" for k in keys]
    return members


def all_keys(members: dict[str, list[str]]) -> list[str]:
    """`shard#member` keys as the stream returns them."""
    return sorted(f"{shard}#{m}" for shard, names in members.items() for m in names)


def write_stats(json_root: Path, shard: str | Path, stats: dict) -> Path:
    """The statistics file of a shard at the layout the stream reads."""
    shard = Path(shard)
    path = json_root / shard.parent.name / f"{shard.stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats))
    return path


def stream_keys(ds, workers: int = 0, **loader_kw) -> list[str]:
    """Keys of every item of a finite (`passes=N`, `return_keys=True`) stream, in order."""
    if workers == 0:
        return [key for _, key in ds]
    loader = DataLoader(ds, batch_size=None, num_workers=workers, **loader_kw)
    return [key for _, key in loader]


def stream_items(ds, workers: int = 0) -> list[tuple[torch.Tensor, str]]:
    """(image, key) items of a finite stream."""
    if workers == 0:
        return list(ds)
    return list(DataLoader(ds, batch_size=None, num_workers=workers))
