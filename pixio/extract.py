r"""Class and patch features of every image of a folder or of webdataset shards, written as
safetensors shards and a JSON index.

    python -m pixio.extract --checkpoint encoder.safetensors \
        --images photos/ --out feats/ [--size 256] [--resize short|fixed] [--blocks 7,15,-1]
    torchrun --nproc_per_node 8 -m pixio.extract --model pixio_vith16 --checkpoint enc.pth \
        --shards '/data/web/**/*.tar' --out feats/ --save-dtype bfloat16

Work units: a folder's images (sorted) in groups of `--shard-size`; each webdataset tar one unit.
Unit u belongs to rank u % world size and is written as `features-<u>-<part>.safetensors`
(a tar with more than `--shard-size` images gives several parts), then `features-<u>.json`,
its manifest, last: a unit is finished when its manifest exists, and a rerun (same `--out`,
same settings) skips finished units. Files appear by rename, so an interrupted run leaves none
half-written. After a barrier rank 0 merges the manifests into `index.json`.

A part holds, per block b, `cls.<b>` (N, n_cls, D) and/or `patch.<b>` (sum of h*w, D: each
image's patch tokens in row-major order, image i at rows offsets[i]:offsets[i+1]), `grid` (N, 2)
(h, w per image) and `offsets` (N + 1,); its metadata holds the image keys in row order. Keys: a
path relative to `--images`, or `<tar>#<sample key>.<ext>`. Images that cannot be used are
skipped, counted by reason and named in the index (`corrupt_image`, `not_an_image`,
`unreadable_file`, and `bad_tar` under the tar's path). See README, "Feature extraction CLI".
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pixio.checkpoint import checkpoint_digest
from pixio.data.counters import ShardReport
from pixio.data.curate import write_json_atomic
from pixio.data.images import DecodeError, load_rgb
from pixio.data.shards import read_shard
from pixio.inference import (
    IMAGE_SUFFIXES,
    Resize,
    add_encoder_args,
    add_image_args,
    encoder_build,
    list_images,
    load_frozen_encoder,
    run_cli,
)
from pixio.models.registry import encoder_kwargs
from pixio.runtime import distributed as rd
from pixio.runtime.prefetch import normalize_images

FORMAT = "pixio-features/1"
INDEX_NAME, SETTINGS_NAME = "index.json", "extract.json"
LOCATIONS = ("checkpoint", "source")  # recorded, not compared between runs
TOKENS = ("cls", "patch")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MEMBER_EXTS = tuple(
    s.lstrip(".") for s in IMAGE_SUFFIXES
)  # webdataset image members, by preference


@dataclass(frozen=True)
class Unit:
    """One unit of work: a group of a folder's images (`files`, relative) or one tar."""

    index: int
    source: str  # the folder, or the tar
    files: tuple[str, ...] = ()


@dataclass
class Batch:
    """What a loader worker hands over: same-size images of one unit, or the unit's end."""

    unit: int
    keys: list[str]
    images: torch.Tensor | None  # uint8 (B, 3, H, W)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> "reason: detail"
    last: bool = False


def part_name(unit: int, part: int) -> str:
    return f"features-{unit:05d}-{part:03d}.safetensors"


def manifest_name(unit: int) -> str:
    return f"features-{unit:05d}.json"


# ---- the plan: units and settings --------------------------------------------------------------
def make_units(images: str | None, shards: str | None, shard_size: int) -> list[Unit]:
    """The units of `--images DIR` (groups of `shard_size`) or `--shards GLOB` (one per tar)."""
    if images is not None:
        root = Path(images).expanduser()
        files = [p.relative_to(root).as_posix() for p in list_images(root)]
        groups = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
        return [Unit(u, str(root), tuple(g)) for u, g in enumerate(groups)]
    tars = sorted(p for p in glob.glob(os.path.expanduser(str(shards)), recursive=True))
    tars = [p for p in tars if os.path.isfile(p)]
    if not tars:
        raise FileNotFoundError(f"--shards {shards}: no file matches")
    return [Unit(u, tar) for u, tar in enumerate(tars)]


def inputs_digest(units: list[Unit]) -> str:
    """sha256 of the input list (names, not contents): images relative to the folder (a moved
    folder is the same input), tars as globbed. A changed list is a different run."""
    digest = hashlib.sha256()
    for unit in units:
        digest.update("\n".join(unit.files or (unit.source,)).encode() + b"\0")
    return digest.hexdigest()


def make_settings(args: argparse.Namespace, units: list[Unit], resize: Resize) -> dict[str, Any]:
    """Everything that shapes the output, and where it came from (LOCATIONS, not compared
    between runs: a moved checkpoint or folder is the same run). Rank 0: it reads the
    checkpoint to digest it."""
    return {
        "format": FORMAT,
        "checkpoint": str(args.checkpoint),
        "source": args.images if args.images is not None else args.shards,
        "model": args.model,
        "overrides": dict(args.override),
        "module": args.module,
        "encoder_digest": checkpoint_digest(args.checkpoint),
        "inputs": {"kind": "images" if args.images else "shards", "digest": inputs_digest(units)},
        "blocks": args.blocks,
        "norm": args.norm,
        "tokens": args.tokens,
        "resize": resize.describe(),
        "save_dtype": args.save_dtype,
        "precision": args.precision,
        "shard_size": args.shard_size,
    }


def compared(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in LOCATIONS}


def settings_digest(settings: dict[str, Any]) -> str:
    """What a part and a manifest record of the settings (locations left out)."""
    text = json.dumps(compared(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def claim_output(out: Path, settings: dict[str, Any]) -> None:
    """Record the settings in `out`, or check them against those of the run that started it
    (ValueError naming what differs); remove leftover temporary files of interrupted runs."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_NAME
    if path.is_file():
        old, new = compared(json.loads(path.read_text(encoding="utf-8"))), compared(settings)
        changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
        if changed:
            raise ValueError(
                f"--out {out} holds features extracted with other settings ({', '.join(changed)} "
                "differ): use another --out, or delete it to start again"
            )
    else:
        write_json_atomic(path, settings)
    for tmp in out.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


def is_finished(out: Path, unit: int, digest: str) -> bool:
    """A unit is finished when its manifest exists and names these settings."""
    try:
        manifest = json.loads((out / manifest_name(unit)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("settings") == digest


def on_rank0(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0 only; its result, or its error as one ValueError line, on every rank (a
    failure must not leave the other ranks waiting for a broadcast)."""
    if not rd.is_dist():
        return fn()
    box: list[Any] = [None]
    if rd.get_rank() == 0:
        try:
            box = [(True, fn())]
        except (OSError, ValueError) as err:
            box = [(False, str(err))]
    torch.distributed.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise ValueError(value)
    return value


# ---- reading and decoding (DataLoader workers) -------------------------------------------------
class UnitBatches(IterableDataset):
    """Batches of decoded, resized images, unit by unit; worker w of W takes units w, w+W, ...
    Images of one unit are grouped by size (the "short" policy keeps aspects), in a fixed
    order, so a unit's rows do not depend on the rank or the worker that runs it."""

    def __init__(self, units: list[Unit], resize: Resize, batch_size: int) -> None:
        super().__init__()
        self.units, self.resize, self.batch_size = units, resize, batch_size

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i, unit in enumerate(self.units):
            if i % workers == worker:
                yield from self.unit_batches(unit)

    def unit_batches(self, unit: Unit) -> Iterator[Batch]:
        buckets: dict[tuple[int, ...], list[tuple[str, torch.Tensor]]] = {}
        skipped: dict[str, str] = {}
        for key, image in self.decoded(unit, skipped):
            bucket = buckets.setdefault(tuple(image.shape), [])
            bucket.append((key, image))
            if len(bucket) == self.batch_size:
                yield self._batch(unit, bucket)
                bucket.clear()
        for shape in sorted(buckets):
            if buckets[shape]:
                yield self._batch(unit, buckets[shape])
        yield Batch(unit.index, [], None, skipped, last=True)

    @staticmethod
    def _batch(unit: Unit, items: list[tuple[str, torch.Tensor]]) -> Batch:
        return Batch(unit.index, [k for k, _ in items], torch.stack([x for _, x in items]))

    def decoded(self, unit: Unit, skipped: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, uint8 (3, H, W)) of the unit's usable images; the others go to `skipped`."""
        for key, data in self.encoded(unit, skipped):
            try:
                yield key, self.resize.apply(load_rgb(data))[0]
            except DecodeError as err:
                skipped[key] = f"{err.reason}: {err.detail[:120]}"

    def encoded(self, unit: Unit, skipped: dict[str, str]) -> Iterator[tuple[str, bytes]]:
        """(key, image bytes) of a folder group or of a tar (pixio.data.shards.read_shard)."""
        if unit.files:
            for rel in unit.files:
                try:
                    yield rel, (Path(unit.source) / rel).read_bytes()
                except OSError as err:
                    skipped[rel] = f"unreadable_file: {type(err).__name__}: {err.strerror}"
            return
        report = ShardReport(unit.source, None)
        for sample in read_shard(unit.source, report):
            ext = next((e for e in MEMBER_EXTS if e in sample), None)
            if ext is None:
                skipped[f"{unit.source}#{sample['__key__']}"] = "not_an_image: no image member"
                continue
            yield f"{unit.source}#{sample['__key__']}.{ext}", sample[ext]
        for reason in report.problems():  # damage of the tar itself (bad_tar): named by its path
            skipped[unit.source] = f"{reason}: {report.details.get(reason, '')}"
        report.close()


# ---- encoding and writing ----------------------------------------------------------------------
@dataclass
class Encoding:
    """How features are computed and stored."""

    blocks: list[int]  # non-negative, in the order asked
    norm: bool
    tokens: tuple[str, ...]
    save_dtype: torch.dtype
    precision: str  # "fp32" | "bf16" (autocast)
    device: torch.device


@torch.no_grad()
def encode(
    encoder: torch.nn.Module, images: torch.Tensor, how: Encoding
) -> dict[str, torch.Tensor]:
    """uint8 (B, 3, H, W) -> {"cls.<b>": (B, n_cls, D), "patch.<b>": (B, h*w, D)} on the CPU."""
    x = normalize_images(images.to(how.device, non_blocking=True))
    with torch.autocast(how.device.type, torch.bfloat16, enabled=how.precision == "bf16"):
        feats = encoder(x, how.blocks)
    suffix = "_norm" if how.norm else ""
    out = {}
    for block, f in zip(how.blocks, feats, strict=True):
        for token in how.tokens:
            out[f"{token}.{block}"] = f[f"{token}_tokens{suffix}"].to("cpu", how.save_dtype)
    return out


class UnitWriter:
    """Collects one unit's rows; writes a part of `shard_size` rows whenever it has that many
    (the last part holds the rest), then the manifest. Every file is written to a temporary
    name and renamed."""

    def __init__(self, out: Path, unit: Unit, shard_size: int, digest: str) -> None:
        self.out, self.unit, self.shard_size, self.digest = out, unit, shard_size, digest
        self.keys: list[str] = []
        self.grids: list[tuple[int, int]] = []
        self.feats: list[dict[str, torch.Tensor]] = []
        self.parts: list[str] = []
        self.rows: dict[str, list[Any]] = {}

    def add(self, keys: list[str], grid: tuple[int, int], feats: dict[str, torch.Tensor]) -> None:
        self.keys += keys
        self.grids += [grid] * len(keys)
        # patches (B, h*w, D) -> (B*h*w, D): images of a unit may differ in size
        self.feats.append(
            {k: v.flatten(0, 1) if k.startswith("patch.") else v for k, v in feats.items()}
        )
        while len(self.keys) >= self.shard_size:
            self.flush(self.shard_size)

    def flush(self, n: int) -> None:
        """Write the first `n` rows collected as the next part; keep the others."""
        name = part_name(self.unit.index, len(self.parts))
        grid = torch.tensor(self.grids, dtype=torch.int64)  # (N, 2)
        offsets = torch.cat([grid.new_zeros(1), (grid[:, 0] * grid[:, 1]).cumsum(0)])  # (N + 1,)
        merged = {k: torch.cat([f[k] for f in self.feats]) for k in self.feats[0]}
        cut = {k: int(offsets[n]) if k.startswith("patch.") else n for k in merged}
        tensors = {k: v[: cut[k]].contiguous() for k, v in merged.items()}
        tensors.update(grid=grid[:n].to(torch.int32), offsets=offsets[: n + 1].clone())
        metadata = {"keys": json.dumps(self.keys[:n]), "settings": self.digest, "format": FORMAT}
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, self.out / name)
        self.rows.update({key: [name, row] for row, key in enumerate(self.keys[:n])})
        self.parts.append(name)
        self.keys, self.grids = self.keys[n:], self.grids[n:]
        self.feats = [{k: v[cut[k] :] for k, v in merged.items()}] if self.keys else []

    def finish(self, skipped: dict[str, str]) -> dict[str, Any]:
        """Write the last part and the manifest (the unit's completion mark)."""
        if self.keys:
            self.flush(len(self.keys))
        manifest = {
            "unit": self.unit.index, "source": self.unit.source, "settings": self.digest,
            "rank": rd.get_rank(), "parts": self.parts, "rows": self.rows, "skipped": skipped,
        }  # fmt: skip
        write_json_atomic(self.out / manifest_name(self.unit.index), manifest)
        return manifest


def run_units(
    encoder: torch.nn.Module, units: list[Unit], loader: DataLoader, out: Path, how: Encoding,
    shard_size: int, digest: str, max_shards: int | None,
) -> int:  # fmt: skip
    """Encode and write this rank's pending units; returns how many were finished."""
    by_index = {u.index: u for u in units}
    writers: dict[int, UnitWriter] = {}
    total = sum(len(u.files) for u in units) or None  # unknown for tars
    bar = tqdm(total=total, unit="img", desc="extract", disable=rd.get_rank() != 0)
    finished = 0
    for batch in loader:
        unit = by_index[batch.unit]
        writer = writers.setdefault(batch.unit, UnitWriter(out, unit, shard_size, digest))
        if batch.images is not None:
            grid = encoder.patch_grid(batch.images)
            writer.add(batch.keys, grid, encode(encoder, batch.images, how))
        bar.update(len(batch.keys) + len(batch.skipped))
        if batch.last:
            writers.pop(batch.unit).finish(batch.skipped)
            finished += 1
            if max_shards is not None and finished >= max_shards:
                break
    bar.close()
    return finished


# ---- the index -----------------------------------------------------------------------------------
def build_index(out: Path, units: list[Unit], settings: dict[str, Any]) -> dict[str, Any] | None:
    """Merge every unit's manifest into `index.json` (rank 0); None while units are missing."""
    digest = settings_digest(settings)
    manifests = []
    for unit in units:
        if not is_finished(out, unit.index, digest):
            return None
        manifests.append(json.loads((out / manifest_name(unit.index)).read_text("utf-8")))
    images: dict[str, list[Any]] = {}
    skipped: dict[str, str] = {}
    for manifest in manifests:
        images.update(manifest["rows"])
        skipped.update(manifest["skipped"])
    reasons: dict[str, int] = {}
    for reason in skipped.values():
        reasons[reason.split(":")[0]] = reasons.get(reason.split(":")[0], 0) + 1
    index = {
        **settings,
        "shards": [p for m in manifests for p in m["parts"]],
        "counts": {"images": len(images), "skipped": len(skipped), "by_reason": reasons},
        "images": images,
        "skipped": skipped,
    }
    write_json_atomic(out / INDEX_NAME, index)
    return index


def read_features(out: str | Path, key: str) -> dict[str, torch.Tensor]:
    """One image's features from an extraction folder: `cls.<b>` (n_cls, D), `patch.<b>`
    (h*w, D) and `grid` (h, w). Reads the whole part file: for many images, read the parts."""
    out = Path(out)
    index = json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))
    if key not in index["images"]:
        reason = index["skipped"].get(key)
        raise KeyError(f"{key}: {'skipped, ' + reason if reason else 'not in ' + str(out)}")
    name, row = index["images"][key]
    part = load_file(str(out / name))
    start, stop = part["offsets"][row].item(), part["offsets"][row + 1].item()
    result = {"grid": part["grid"][row]}
    for k, v in part.items():
        if k.startswith("cls."):
            result[k] = v[row]
        elif k.startswith("patch."):
            result[k] = v[start:stop]
    return result


# ---- the command -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pixio.extract", description=__doc__.split("\n")[0]
    )
    add_encoder_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (recursive)")
    source.add_argument("--shards", help="webdataset tars: a glob, quoted ('data/**/*.tar')")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    add_image_args(parser)
    parser.add_argument("--blocks", default="-1", help="block ids, e.g. 7,15,23,-1 (default -1)")
    parser.add_argument(
        "--norm", action=argparse.BooleanOptionalAction, default=True,
        help="final norm applied to the features (default); --no-norm: the blocks' outputs",
    )  # fmt: skip
    parser.add_argument("--tokens", default="cls,patch", help="cls, patch or cls,patch")
    parser.add_argument("--save-dtype", default="float32", choices=list(SAVE_DTYPES))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1000, help="images per output part")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes per rank")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--max-shards", type=int,
        help="stop after finishing this many units per rank (a rerun continues)",
    )  # fmt: skip
    return parser


def check_args(args: argparse.Namespace, depth: int) -> None:
    """Normalise --blocks / --tokens; ValueError naming the bad flag."""
    try:
        blocks = [int(b) for b in args.blocks.split(",")]
    except ValueError:
        raise ValueError(f"--blocks {args.blocks!r}: comma-separated integers") from None
    if not all(-depth <= b < depth for b in blocks):
        raise ValueError(f"--blocks {args.blocks}: out of range for an encoder of depth {depth}")
    args.blocks = list(dict.fromkeys(b % depth for b in blocks))
    asked = args.tokens.split(",")
    if not asked or set(asked) - set(TOKENS):
        raise ValueError(f"--tokens {args.tokens!r}: one or both of {', '.join(TOKENS)}")
    args.tokens = [t for t in TOKENS if t in asked]
    for flag in ("batch_size", "shard_size", "workers"):
        if getattr(args, flag) < (0 if flag == "workers" else 1):
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: too small")


def extract(args: argparse.Namespace) -> dict[str, Any]:
    """The run (every rank): plan, load, claim the output, encode this rank's units, index."""
    args.model, build = encoder_build(args.model, args.checkpoint, args.module, dict(args.override))
    arch = encoder_kwargs(args.model, **build)
    check_args(args, arch["depth"])
    resize = Resize.parse(args.size, args.resize, arch["patch_size"])
    info = rd.init_distributed(device=args.device, timeout_min=180.0)
    try:
        units = on_rank0(lambda: make_units(args.images, args.shards, args.shard_size))
        encoder = load_frozen_encoder(
            args.model, args.checkpoint, args.module, info.device, **build
        )
        settings = on_rank0(lambda: _claim(args, units, resize))
        digest = settings_digest(settings)
        mine = [u for u in units if u.index % info.world_size == info.rank]
        pending = [u for u in mine if not is_finished(args.out, u.index, digest)]
        how = Encoding(
            args.blocks, args.norm, tuple(args.tokens), SAVE_DTYPES[args.save_dtype],
            args.precision, info.device,
        )  # fmt: skip
        loader = DataLoader(
            UnitBatches(pending, resize, args.batch_size), batch_size=None,
            num_workers=args.workers,
        )  # fmt: skip
        done = run_units(
            encoder, pending, loader, args.out, how, args.shard_size, digest, args.max_shards
        )
        rd.barrier()  # every rank's units written (or stopped by --max-shards)
        index = on_rank0(lambda: _index_summary(args.out, build_index(args.out, units, settings)))
    finally:
        rd.cleanup()
    return {
        "rank": info.rank, "out": str(args.out), "units": len(units),
        "this_rank": {"units": len(mine), "already_done": len(mine) - len(pending), "done": done},
        **index,
    }  # fmt: skip


def _claim(args: argparse.Namespace, units: list[Unit], resize: Resize) -> dict[str, Any]:
    settings = make_settings(args, units, resize)
    claim_output(args.out, settings)
    return settings


def _index_summary(out: Path, index: dict[str, Any] | None) -> dict[str, Any]:
    """What every rank reports of rank 0's index (not the index: it may be large)."""
    if index is None:
        return {"index": None, "counts": None}
    return {"index": str(out / INDEX_NAME), "counts": index["counts"]}


def main(argv: list[str] | None = None) -> None:
    summary = run_cli("pixio.extract", build_parser(), extract, argv)
    if summary["rank"] == 0:
        if summary["index"] is None:
            print(f"units left to do: run the same command again to finish ({summary['out']})")
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
