"""The pre-training stream: webdataset shards -> filtered, randomly cropped, normalised images.

One *reader* is one DataLoader worker of one rank. Each iteration builds a `wds.DataPipeline`:
shard plan -> webdataset tar reader -> filters -> decode + crop (uint8) -> shuffle -> normalise.
See docs/data.md for the design and SPEC section 5 for the formats and filter rules.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.data.counters import ShardReport, SkipCounter
from pixio.data.filters import FilterConfig, ShardFilter, open_shard_filter
from pixio.data.images import DecodeError, decode_crop
from pixio.data.shards import KINDS, check_kind, find_shards, read_shard
from pixio.runtime.distributed import read_dist_env

log = logging.getLogger("pixio.data")

# Independent random streams per purpose, all derived from (seed, epoch, ...).
TAG_ORDER, TAG_RESAMPLE, TAG_CROP, TAG_SOFT, TAG_SHUFFLE = range(5)
# An endless stream whose reader keeps getting nothing would hang the DataLoader silently.
MAX_EMPTY_PASSES = 20


def default_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """torch.distributed's rank / world size when initialised, else the launcher's variables
    (torchrun or SLURM, `pixio.runtime.distributed.read_dist_env`), else 0 / 1."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        default_rank, default_world = dist.get_rank(), dist.get_world_size()
    else:  # before the process group exists: torchrun's or SLURM's variables
        env = read_dist_env()
        default_rank, default_world = env.rank, env.world_size
    rank = default_rank if rank is None else int(rank)
    world_size = default_world if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


@dataclass(frozen=True)
class Reader:
    """This reader's place: `index` of `total` (= rank * num_workers + worker of world * workers)."""

    index: int
    total: int
    rank: int
    worker: int


@dataclass(frozen=True)
class ShardRead:
    """One planned read of one shard during pass `pass_index`."""

    shard: Path
    pass_index: int


def seeded(*entropy: int) -> np.random.Generator:
    """A numpy generator seeded by a tuple of non-negative integers."""
    return np.random.default_rng(list(entropy))


def reader_seed(seed: int, epoch: int, reader: Reader, tag: int) -> int:
    """An integer seed (for python's `random`) from (seed, epoch, rank, worker, purpose)."""
    return int(seeded(seed, epoch, reader.rank, reader.worker, tag).integers(2**62))


def web_plan(shards: list[Path], reader: Reader, seed: int, epoch: int, passes: int | None):
    """Per pass one permutation of all shards (shared by readers); reader i takes i, i+total...

    With fewer shards than readers every reader reads every shard (samples are strided later).
    """
    for p in itertools.count() if passes is None else range(passes):
        order = seeded(seed, epoch, p, TAG_ORDER).permutation(len(shards))
        mine = order if len(shards) < reader.total else order[reader.index :: reader.total]
        for i in mine:
            yield ShardRead(shards[i], p)


def imagenet_plan(shards: list[Path], reader: Reader, seed: int, epoch: int, passes: int | None):
    """Draws with replacement from the reader's subset (`wds.ResampledShards`, seeded).

    A pass is as many draws as the subset has shards.
    """
    subset = shards if len(shards) < reader.total else shards[reader.index :: reader.total]
    resample_seed = reader_seed(seed, epoch, reader, TAG_RESAMPLE)
    draws = sys.maxsize if passes is None else passes * len(subset)
    resampled = wds.ResampledShards(
        [str(s) for s in subset], nshards=draws, seed=seed, worker_seed=lambda: resample_seed,
        deterministic=True,
    )  # fmt: skip
    for n, item in enumerate(resampled):
        yield ShardRead(Path(item["url"]), n // len(subset))


class PretrainDataset(IterableDataset):
    """Endless (or `passes`-long) stream of normalised float32 (3, S, S) crops; see docs/data.md."""

    def __init__(
        self,
        root: Path,
        shards: list[Path],
        kind: str,
        input_size: int,
        crop_scale: tuple[float, float],
        filters: FilterConfig,
        json_root: Path | None,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        passes: int | None = None,
        reduced_decode: bool = True,
        return_keys: bool = False,
    ) -> None:
        super().__init__()
        self.root, self.shards, self.kind = root, shards, kind
        self.input_size, self.crop_scale = input_size, crop_scale
        self.filters, self.json_root = filters, json_root
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.passes = shuffle_buffer, passes
        self.reduced_decode, self.return_keys = reduced_decode, return_keys
        self.image_exts = KINDS[kind][2]
        self.counter = SkipCounter()
        # [epoch, "fewer shards than readers" logged]: shared so persistent workers see set_epoch.
        self._shared = torch.zeros(2, dtype=torch.int64).share_memory_()
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._bias = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std

    @property
    def epoch(self) -> int:
        """The epoch the next iterator will use."""
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (call before creating the epoch's iterator)."""
        self._shared[0] = int(epoch)

    def skip_counts(self) -> dict[str, int]:
        """Skips by reason over this process and all its DataLoader workers so far."""
        return self.counter.totals()

    def reader(self) -> Reader:
        """This process's reader (DataLoader worker of this rank)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        total = self.world_size * workers
        return Reader(self.rank * workers + worker, total, self.rank, worker)

    def __iter__(self) -> Iterator[Any]:
        reader, epoch = self.reader(), self.epoch
        self._log_sharing(reader)
        plan_fn = web_plan if self.kind == "web" else imagenet_plan
        plan = functools.partial(plan_fn, self.shards, reader, self.seed, epoch, self.passes)
        stages: list[Any] = [plan, functools.partial(self._samples, reader=reader, epoch=epoch)]
        if self.shuffle_buffer > 0:
            rng = random.Random(reader_seed(self.seed, epoch, reader, TAG_SHUFFLE))
            initial = min(self.shuffle_buffer, 1000)
            stages.append(wds.shuffle(self.shuffle_buffer, initial=initial, rng=rng))
        stages.append(self._normalise)
        return iter(wds.DataPipeline(*stages))

    def _log_sharing(self, reader: Reader) -> None:
        """Log once (across epochs and workers) that readers share shards."""
        if len(self.shards) < reader.total and reader.index == 0 and not int(self._shared[1]):
            self._shared[1] = 1
            log.info(
                "%d shards for %d readers: every reader reads every shard and keeps every "
                "%d-th sample", len(self.shards), reader.total, reader.total,
            )  # fmt: skip

    def _samples(self, plan: Iterable[ShardRead], reader: Reader, epoch: int) -> Iterator[Any]:
        """(uint8 crop, key) for every kept sample of the planned shard reads."""
        crop_rng = seeded(self.seed, epoch, reader.rank, reader.worker, TAG_CROP)
        soft_rng = seeded(self.seed, epoch, reader.rank, reader.worker, TAG_SOFT)
        stride = reader.total if len(self.shards) < reader.total else 1
        offset = reader.index if stride > 1 else 0
        empty_passes = 0
        for pass_index, reads in itertools.groupby(plan, key=lambda r: r.pass_index):
            produced = 0
            for read in reads:
                for item in self._shard_samples(read.shard, crop_rng, soft_rng, stride, offset):
                    produced += 1
                    yield item
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes:
                self._report_empty_pass(reader, pass_index, empty_passes)

    def _report_empty_pass(self, reader: Reader, pass_index: int, count: int) -> None:
        """Warn about a pass without any usable sample; fail after MAX_EMPTY_PASSES in a row."""
        message = (
            f"reader {reader.index}/{reader.total}: pass {pass_index} over {self.root} gave no "
            f"usable sample ({count} in a row); skips so far: {self.skip_counts()}"
        )
        if count >= MAX_EMPTY_PASSES:
            raise RuntimeError(message)
        log.warning(message)

    def _shard_samples(
        self,
        shard: Path,
        crop_rng: np.random.Generator,
        soft_rng: np.random.Generator,
        stride: int,
        offset: int,
    ) -> Iterator[tuple[torch.Tensor, str]]:
        """Read one shard: stride, filter, decode + crop; problems counted and logged once."""
        report = ShardReport(str(shard), self.counter)
        try:
            shard_filter = open_shard_filter(self.filters, shard, self.json_root, report, soft_rng)
            if shard_filter is None:
                return
            for i, sample in enumerate(read_shard(shard, report)):
                if i % stride != offset:
                    continue
                item = self._sample(sample, shard, shard_filter, crop_rng, report)
                if item is not None:
                    yield item
        finally:
            report.close()

    def _sample(
        self,
        sample: dict[str, Any],
        shard: Path,
        shard_filter: ShardFilter,
        crop_rng: np.random.Generator,
        report: ShardReport,
    ) -> tuple[torch.Tensor, str] | None:
        """One webdataset sample -> (uint8 crop, "shard#member"), or None if it is skipped."""
        key = sample["__key__"]
        ext = next((e for e in self.image_exts if e in sample), None)
        if ext is None:
            report.add("not_an_image", detail=f"{key}: no .{'/.'.join(self.image_exts)} member")
            return None
        if not shard_filter.keep(key, ext):
            return None
        try:
            image = decode_crop(
                sample[ext], self.input_size, crop_rng, self.crop_scale, self.reduced_decode
            )
        except DecodeError as err:
            report.add(err.reason, detail=f"{key}.{ext}: {err.detail[:80]}")
            return None
        return image, f"{shard}#{key}.{ext}"

    def _normalise(self, src: Iterable[tuple[torch.Tensor, str]]) -> Iterator[Any]:
        """uint8 -> ImageNet-normalised float32 in one fused multiply-add."""
        for image, key in src:
            out = torch.addcmul(self._bias, image, self._scale).contiguous()
            yield (out, key) if self.return_keys else out


def build_pretrain_dataset(
    root: str | Path,
    kind: str = "imagenet",
    input_size: int = 256,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    json_root: str | Path | None = None,
    hist_thresh: float | None = None,
    imgres_thresh: int | None = None,
    soft_sampling: bool = False,
    missing_json: str = "unfiltered",
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 10000,
    passes: int | None = None,
    reduced_decode: bool = True,
    return_keys: bool = False,
) -> PretrainDataset:
    """The pre-training stream over the shards under `root` (docs/data.md, SPEC section 5).

    Fails at once with FileNotFoundError when `root` holds no shard of `kind`, and with
    ValueError for filters without `json_root` or invalid settings.
    """
    check_kind(kind)
    filters = FilterConfig(hist_thresh, imgres_thresh, bool(soft_sampling), missing_json)
    _check_settings(kind, filters, json_root, input_size, crop_scale, seed, shuffle_buffer, passes)
    rank, world_size = default_rank_world(rank, world_size)
    shards = find_shards(root, kind)
    json_path = Path(json_root).expanduser() if json_root is not None else None
    return PretrainDataset(
        Path(root), shards, kind, int(input_size), (float(crop_scale[0]), float(crop_scale[1])),
        filters, json_path, int(seed), rank, world_size, int(shuffle_buffer), passes,
        reduced_decode, return_keys,
    )  # fmt: skip


def _check_settings(
    kind: str,
    filters: FilterConfig,
    json_root: str | Path | None,
    input_size: int,
    crop_scale: tuple[float, float],
    seed: int,
    shuffle_buffer: int,
    passes: int | None,
) -> None:
    """ValueError for settings the stream cannot honour."""
    if filters.active and json_root is None:
        raise ValueError("hist_thresh / imgres_thresh / soft_sampling need json_root")
    if filters.active and kind != "web":
        raise ValueError(f"filters apply to kind 'web' only, not {kind!r}")
    if int(input_size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if not 0.0 < float(crop_scale[0]) <= float(crop_scale[1]) <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
    if int(seed) < 0 or int(shuffle_buffer) < 0:
        raise ValueError(f"seed and shuffle_buffer must be >= 0, got {seed}, {shuffle_buffer}")
    if passes is not None and int(passes) < 1:
        raise ValueError(f"passes must be >= 1 or None, got {passes}")
