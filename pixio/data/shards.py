"""Shard discovery (glob or shard-list file, once per job), the statistics-file layout, and
reading one shard (webdataset's sample layout)."""

from __future__ import annotations

import json
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import tar_file_expander, url_opener

from pixio.data.counters import ShardReport
from pixio.runtime.distributed import is_dist

# kind -> (shard pattern relative to the root, recursive?, image member extensions by preference)
KINDS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "imagenet": ("*train*.tar", False, ("jpg",)),
    "web": ("**/*.tar", True, ("jpeg", "jpg")),
}
TAR_BLOCK = 512
# webdataset's sample convention: key = path up to the first dot of the base name, then the
# extension; members named like `__x__` carry metadata, not samples.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
META_MEMBER = re.compile(r"__[^/]*__($|/)")


def check_kind(kind: str) -> None:
    """ValueError naming the valid kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; valid: {', '.join(KINDS)}")


def find_shards(root: str | Path, kind: str, shard_list: str | Path | None = None) -> list[Path]:
    """The shards of `kind` under `root` (sorted), or those of `shard_list` (in file order).

    FileNotFoundError naming the path and pattern (or the list and its first missing entry).
    """
    check_kind(kind)
    if shard_list is not None:
        return read_shard_list(shard_list, root)
    pattern, recursive, _ = KINDS[kind]
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a directory")
    found = root.rglob("*.tar") if recursive else root.glob(pattern)
    shards = sorted(p.absolute() for p in found if p.is_file())
    if not shards:
        raise FileNotFoundError(f"no shard matching {root / pattern} ({kind} layout)")
    return shards


def read_shard_list(shard_list: str | Path, root: str | Path) -> list[Path]:
    """Shard paths of a list file: one per line, blank lines and `#` comment lines ignored,
    relative entries resolved against `root` (data.root). Every entry must be a file."""
    path = Path(shard_list).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FileNotFoundError(f"shard list {path} cannot be read: {err}") from err
    base = Path(root).expanduser()
    entries = [line.strip() for line in lines]
    shards = [(base / e).absolute() for e in entries if e and not e.startswith("#")]
    if not shards:
        raise FileNotFoundError(f"shard list {path} lists no shard")
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard list {path}: {len(missing)} of {len(shards)} listed shards missing, "
            f"first: {missing[0]}"
        )
    return shards


def discover_shards(
    root: str | Path, kind: str, shard_list: str | Path | None = None
) -> list[Path]:
    """`find_shards` once per job: with a process group rank 0 looks and broadcasts the list
    (or its error), so 256 ranks do not each walk the file system; otherwise a local look."""
    if not is_dist():
        return find_shards(root, kind, shard_list)
    import torch.distributed as dist

    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload = [[str(p) for p in find_shards(root, kind, shard_list)]]
        except (OSError, ValueError) as err:  # any failure: the other ranks wait for rank 0
            payload = [(type(err).__name__, str(err))]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], tuple):  # rank 0 failed: every rank raises the same error
        name, message = payload[0]
        kinds = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}
        raise kinds.get(name, OSError)(message)
    return [Path(p) for p in payload[0]]


def stats_path(shard: str | Path, json_root: str | Path) -> Path:
    """`<json_root>/<parent dir of the tar>/<tar name>.json` (the reference's layout)."""
    shard = Path(shard)
    return Path(json_root) / shard.parent.name / f"{shard.stem}.json"


def load_stats(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(statistics, None), or (None, `missing_json` / `bad_json`) when they cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "missing_json"
    except (OSError, UnicodeDecodeError):  # unreadable, or not UTF-8: unusable like bad JSON
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


def read_shard(
    shard: str | Path, report: ShardReport, start: float = 0.0
) -> Iterator[dict[str, Any]]:
    """Samples of one shard: `__key__`, `__url__` and lower-case extension -> bytes, from the
    sample at fraction `start` of the shard to its end, then from its beginning (a rotation:
    every sample once).

    webdataset's conventions (key = member path up to the first dot of its base name; members
    of a sample are consecutive; `__x__` members skipped) with a seekable reader: the headers are
    listed first (512 bytes each), then each member is one seek + one read, about 3x less CPU
    than webdataset's 10 KB streaming reads. Damage (unreadable or truncated tar, a repeated
    member) is counted as `bad_tar` on `report` at most once per read; the samples before it
    are used.
    """
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            groups = _sample_groups(_list_members(tar, report), report)
            first = int(start * len(groups)) % max(1, len(groups))
            for key, infos in groups[first:] + groups[:first]:
                sample = _read_sample(tar, key, infos, str(shard), report)
                if sample is not None:
                    yield sample
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        _bad_tar(report, f"{type(err).__name__}: {str(err)[:120]}")
    if not report.has("bad_tar") and not tar_is_complete(shard):
        report.add("bad_tar", detail="truncated (no end-of-archive block)")


def _read_sample(
    tar: tarfile.TarFile,
    key: str,
    infos: list[tuple[str, tarfile.TarInfo]],
    url: str,
    report: ShardReport,
) -> dict[str, Any] | None:
    """One sample's members, or None (counted `bad_tar`) when its data cannot be read, e.g.
    beyond the end of a truncated tar: the other samples of the shard are still used."""
    sample: dict[str, Any] = {"__key__": key, "__url__": url}
    try:
        for ext, info in infos:
            member = tar.extractfile(info)
            assert member is not None  # a regular file always has a data stream
            data = member.read(info.size)
            if len(data) != info.size:
                raise EOFError(f"{info.name}: {len(data)} of {info.size} bytes")
            sample[ext] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        _bad_tar(report, f"{type(err).__name__}: {str(err)[:120]}")
        return None
    return sample


def _list_members(tar: tarfile.TarFile, report: ShardReport) -> list[tarfile.TarInfo]:
    """The regular, non-`__meta__` members whose headers read (those before damage)."""
    infos: list[tarfile.TarInfo] = []
    try:
        for info in tar:
            if info.isreg() and not META_MEMBER.match(info.name):
                infos.append(info)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        _bad_tar(report, f"{type(err).__name__}: {str(err)[:120]}")
    return infos


def _sample_groups(
    infos: list[tarfile.TarInfo], report: ShardReport
) -> list[tuple[str, list[tuple[str, tarfile.TarInfo]]]]:
    """Consecutive members with the same key as one sample: (key, [(ext, member), ...])."""
    groups: list[tuple[str, list[tuple[str, tarfile.TarInfo]]]] = []
    for info in infos:
        match = MEMBER_NAME.match(info.name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        if any(e == ext for e, _ in groups[-1][1]):
            _bad_tar(report, f"repeated member {info.name}")
            continue
        groups[-1][1].append((ext, info))
    return groups


def tar_members(shard: str | Path, report: ShardReport) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular, non-`__meta__` members of a tar, in order."""
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for info in _list_members(tar, report):
                member = tar.extractfile(info)
                assert member is not None  # a regular file always has a data stream
                yield info.name, member.read(info.size)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        _bad_tar(report, f"{type(err).__name__}: {str(err)[:120]}")


def _bad_tar(report: ShardReport, detail: str) -> None:
    if not report.has("bad_tar"):
        report.add("bad_tar", detail=detail)


def read_members(shard: str | Path, report: ShardReport) -> Iterator[dict[str, Any]]:
    """The regular files of one shard as `{"fname", "data"}` (webdataset's tar reader)."""
    handler = tar_error_handler(report)
    streams = url_opener(iter([{"url": str(shard)}]), handler=handler)
    yield from tar_file_expander(streams, handler=handler, eof_value=None)
    if not report.has("bad_tar") and not tar_is_complete(shard):
        report.add("bad_tar", detail="truncated (no end-of-archive block)")
