"""Shard discovery, the statistics-file layout, and reading one shard with webdataset."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from webdataset.tariterators import tar_file_expander, url_opener

from pixio.data.counters import ShardReport

# kind -> (shard pattern relative to the root, recursive?, image member extensions by preference)
KINDS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "imagenet": ("*train*.tar", False, ("jpg",)),
    "web": ("**/*.tar", True, ("jpeg", "jpg")),
}
TAR_BLOCK = 512


def check_kind(kind: str) -> None:
    """ValueError naming the valid kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; valid: {', '.join(KINDS)}")


def find_shards(root: str | Path, kind: str) -> list[Path]:
    """Sorted shard files of `kind` under `root`; FileNotFoundError naming the path and pattern."""
    check_kind(kind)
    pattern, recursive, _ = KINDS[kind]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a directory")
    found = root.rglob("*.tar") if recursive else root.glob(pattern)
    shards = sorted(p.absolute() for p in found if p.is_file())
    if not shards:
        raise FileNotFoundError(f"no shard matching {root / pattern} ({kind} layout)")
    return shards


def stats_path(shard: str | Path, json_root: str | Path) -> Path:
    """`<json_root>/<parent dir of the tar>/<tar name>.json` (SPEC section 5)."""
    shard = Path(shard)
    return Path(json_root) / shard.parent.name / f"{shard.stem}.json"


def load_stats(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(statistics, None), or (None, `missing_json` / `bad_json`) when they cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "missing_json"
    except OSError:
        return None, "bad_json"
    try:
        stats = json.loads(text)
    except ValueError:
        return None, "bad_json"
    return (stats, None) if isinstance(stats, dict) else (None, "bad_json")


def tar_is_complete(path: str | Path) -> bool:
    """A complete tar is whole 512-byte blocks ending in a zero block.

    Python's stream reader treats a tar cut at a member boundary or inside a header as a clean
    end; this O(1) check of the tail catches those cuts.
    """
    try:
        size = os.path.getsize(path)
        if size == 0 or size % TAR_BLOCK:
            return False
        with open(path, "rb") as f:
            f.seek(size - TAR_BLOCK)
            return f.read(TAR_BLOCK) == bytes(TAR_BLOCK)
    except OSError:
        return False


def tar_error_handler(report: ShardReport) -> Callable[[Exception], bool]:
    """webdataset exception handler: count the shard read once as `bad_tar`, then carry on."""

    def handler(exn: Exception) -> bool:
        if not report.has("bad_tar"):
            message = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # drop stream repr
            report.add("bad_tar", detail=f"{type(exn).__name__}: {message[:120]}")
        return True  # keep going: the samples before the damage are used

    return handler


def read_shard(shard: str | Path, report: ShardReport) -> Iterator[dict[str, Any]]:
    """webdataset samples of one shard (`__key__`, lower-case extensions -> bytes).

    Damage is counted as `bad_tar` on `report` (at most once per read); samples before it are used.
    """
    handler = tar_error_handler(report)
    yield from wds.tarfile_samples(iter([{"url": str(shard)}]), handler=handler)
    if not report.has("bad_tar") and not tar_is_complete(shard):
        report.add("bad_tar", detail="truncated (no end-of-archive block)")


def read_members(shard: str | Path, report: ShardReport) -> Iterator[dict[str, Any]]:
    """The regular files of one shard as `{"fname", "data"}` (webdataset's tar reader)."""
    handler = tar_error_handler(report)
    streams = url_opener(iter([{"url": str(shard)}]), handler=handler)
    yield from tar_file_expander(streams, handler=handler, eof_value=None)
    if not report.has("bad_tar") and not tar_is_complete(shard):
        report.add("bad_tar", detail="truncated (no end-of-archive block)")
