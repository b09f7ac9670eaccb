"""The pre-training stream: webdataset shards -> filtered, randomly cropped uint8 images.

Each reader (a logical worker of a rank) walks its shard plan, reads `shard_interleave` shards
at once, filters, shuffles *encoded* samples (pixio/data/stream.py) and only then decodes + crops,
one decode per image delivered. The crop of a sample is drawn from (seed, epoch, salt, rank,
worker, position in the stream), so a stream can be resumed at any position by re-reading bytes.
Batches hold raw uint8 pixels; the trainer's device normalises them
(`pixio.runtime.prefetch.normalize_images`). See docs/data.md for the design and docs/reproduction.md for the formats and filter rules.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pixio.data.counters import SkipCounter
from pixio.data.filters import FilterConfig
from pixio.data.images import DecodeError, decode_crop
from pixio.data.plan import (
    TAG_CROP,
    BatchPlan,
    Cursor,
    Reader,
    StreamKey,
    reader_entropy,
    seeded,
)
from pixio.data.shards import KINDS, check_kind, discover_shards
from pixio.data.stream import EncodedSample, EncodedStream, StreamSource
from pixio.runtime.distributed import read_dist_env

log = logging.getLogger("pixio.data")


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


class PretrainDataset(IterableDataset):
    """Endless (or `passes`-long) stream of uint8 (3, S, S) crops; see docs/data.md.

    Iterating it directly (or through a plain DataLoader) gives single images of epoch
    `set_epoch(...)`; `pixio.runtime.loader.EpochLoader` instead asks `worker_batches` for whole
    batches of a run that spans epochs.
    """

    def __init__(
        self,
        root: Path,
        source: StreamSource,
        input_size: int,
        crop_scale: tuple[float, float],
        rank: int,
        world_size: int,
        reduced_decode: bool = True,
        return_keys: bool = False,
    ) -> None:
        super().__init__()
        self.root, self.source = root, source
        self.input_size, self.crop_scale = input_size, crop_scale
        self.rank, self.world_size = rank, world_size
        self.reduced_decode, self.return_keys = reduced_decode, return_keys
        self.counter = SkipCounter()
        # [epoch, "readers share shards" logged]: shared so persistent workers see set_epoch.
        self._shared = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._fingerprint: str | None = None

    # ---- settings and counts ----------------------------------------------------------------
    @property
    def shards(self) -> list[Path]:
        """The shard files, in plan order."""
        return self.source.shards

    @property
    def seed(self) -> int:
        """The seed every random choice of the stream derives from."""
        return self.source.seed

    @property
    def epoch(self) -> int:
        """The epoch the next plain iterator will use."""
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of plain iteration (call before creating the epoch's iterator)."""
        self._shared[0] = int(epoch)

    def skip_counts(self) -> dict[str, int]:
        """Skips by reason over this process and all its DataLoader workers so far."""
        return self.counter.totals()

    def stream_counts(self) -> dict[str, int]:
        """decoded / delivered images and replayed samples / bytes over this process and its
        workers (pixio.data.counters.EVENTS)."""
        return self.counter.event_totals()

    def fingerprint(self) -> str:
        """A short digest of everything besides the loader layout that shapes the stream: the
        shard list (relative to the root, so a moved mount point keeps it) and the settings."""
        if self._fingerprint is None:
            s, root = self.source, self.root.expanduser().absolute()
            text = repr((
                s.kind, s.filters, s.shuffle_buffer, s.shuffle_bytes, s.interleave, s.passes,
                self.input_size, self.crop_scale, self.reduced_decode,
            ))  # fmt: skip
            names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in s.shards]  # fmt: skip
            crc = zlib.crc32("\n".join(names).encode(), zlib.crc32(text.encode()))
            self._fingerprint = f"{len(s.shards)}-{crc:08x}"
        return self._fingerprint

    # ---- streams ----------------------------------------------------------------------------
    def encoded_stream(
        self, reader: Reader, key: StreamKey, owed: int | None = None
    ) -> EncodedStream:
        """One reader's encoded samples (nothing decoded): what tests and resumes walk."""
        self._log_sharing(reader)
        return EncodedStream(self.source, reader, key, self.counter, owed)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = Reader(self.rank, worker, workers, self.world_size)
        key = StreamKey(self.epoch)
        stream = self.encoded_stream(reader, key)
        for sample in stream:
            image = self.decode(sample, reader, key, stream.position - 1)
            self._count(1, int(image is not None))
            if image is not None:
                image = image.contiguous()  # the resize leaves it channels-last
                yield (image, sample.key) if self.return_keys else image

    def worker_batches(
        self, plan: BatchPlan, worker: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 (B, 3, S, S) batch, int64 [iteration, worker, epoch, start, position]) for
        every iteration of logical `worker` from the plan's start, switching epochs itself.

        A cursor with a position first skips that many encoded samples without decoding them.
        Ends only if the data does (`passes`).
        """
        reader = Reader(self.rank, worker, plan.workers, self.world_size)
        iteration, cursor = plan.first_iteration(worker), plan.cursors[worker]
        while True:
            key, stream = plan.key(cursor), self._resume_stream(plan, reader, cursor)
            end = (cursor.epoch + 1) * plan.iters_per_epoch
            while iteration < end:
                images = self._take(stream, reader, key, plan.batch_size)
                if images is None:
                    return
                meta = [iteration, worker, cursor.epoch, cursor.start, stream.position]
                yield self._batch(images), torch.tensor(meta)
                iteration += plan.workers
            epoch = iteration // plan.iters_per_epoch
            cursor = Cursor(epoch, epoch * plan.iters_per_epoch)

    def _resume_stream(self, plan: BatchPlan, reader: Reader, cursor: Cursor) -> EncodedStream:
        """The cursor's stream, advanced to its position by re-reading bytes (no decode)."""
        stream = self.encoded_stream(reader, plan.key(cursor), plan.owed(reader.worker, cursor))
        if cursor.position:
            read = stream.skip(cursor.position)
            self.counter.add_event("replayed", stream.position)
            self.counter.add_event("replayed_bytes", read)
        return stream

    def _take(
        self, stream: EncodedStream, reader: Reader, key: StreamKey, n: int
    ) -> list[torch.Tensor] | None:
        """The next `n` decodable images of the stream (None when the stream ends first)."""
        images: list[torch.Tensor] = []
        tried = 0
        while len(images) < n:
            sample = next(stream, None)
            if sample is None:
                return None
            image = self.decode(sample, reader, key, stream.position - 1)
            tried += 1
            if image is not None:
                images.append(image)
        self._count(tried, n)
        return images

    def _count(self, decoded: int, delivered: int) -> None:
        """Stream events (once per batch: shared-tensor updates cost ~50 us each)."""
        self.counter.add_event("decoded", decoded)
        self.counter.add_event("delivered", delivered)

    def decode(
        self, sample: EncodedSample, reader: Reader, key: StreamKey, position: int
    ) -> torch.Tensor | None:
        """Decode + RandomResizedCrop -> uint8 (3, S, S), the crop drawn from the sample's place
        in the stream; None (counted, logged once per shard and reason) when unusable."""
        rng = seeded(*reader_entropy(self.seed, key, reader, TAG_CROP), position)
        try:
            image = decode_crop(
                sample.data, self.input_size, rng, self.crop_scale, self.reduced_decode
            )
        except DecodeError as err:
            member = sample.key.rsplit("#", 1)[-1]
            self.counter.log_problem(sample.shard, err.reason, f"{member}: {err.detail[:80]}")
            return None
        return image

    @staticmethod
    def _batch(images: list[torch.Tensor]) -> torch.Tensor:
        """The crops stacked as uint8 (B, 3, S, S), a quarter of float32's bytes in shared
        memory, pinning and the host-to-device copy. Inside a DataLoader worker it is built
        directly in shared memory (as torch's default_collate does), so handing it to the
        training process copies nothing."""
        shape = (len(images), *images[0].shape)
        out = torch.empty(0, dtype=torch.uint8)
        if get_worker_info() is not None:
            storage = out.untyped_storage()._new_shared(math.prod(shape) * out.element_size())
            out = out.set_(storage)
        return torch.stack(images, out=out.resize_(shape))

    def _log_sharing(self, reader: Reader) -> None:
        """Log once (across epochs and workers) that web readers split shards by sample."""
        n = len(self.shards)
        sharing = self.source.kind == "web" and n < reader.total
        if sharing and reader.index == 0 and not int(self._shared[1]):
            self._shared[1] = 1
            log.info(
                "%d shards for %d readers: each pass, the readers sharing a shard keep every "
                "%d-th or %d-th sample of it", n, reader.total, reader.total // n,
                -(-reader.total // n),
            )  # fmt: skip


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
    shuffle_buffer_mb: float = 1024,
    shard_interleave: int = 8,
    shard_list: str | Path | None = None,
    passes: int | None = None,
    reduced_decode: bool = True,
    return_keys: bool = False,
) -> PretrainDataset:
    """The pre-training stream over the shards under `root` (or listed in `shard_list`).

    Fails at once with FileNotFoundError when there is no shard of `kind` (or a listed shard is
    missing), and with ValueError for filters without `json_root` or invalid settings.
    """
    check_kind(kind)
    filters = FilterConfig(hist_thresh, imgres_thresh, bool(soft_sampling), missing_json)
    _check_settings(kind, filters, json_root, input_size, crop_scale, seed, passes)
    _check_buffer(shuffle_buffer, shuffle_buffer_mb, shard_interleave)
    rank, world_size = default_rank_world(rank, world_size)
    shards = discover_shards(root, kind, shard_list)
    source = StreamSource(
        shards, kind, KINDS[kind][2], filters,
        Path(json_root).expanduser() if json_root is not None else None, int(seed),
        int(shuffle_buffer), int(float(shuffle_buffer_mb) * 2**20), int(shard_interleave),
        None if passes is None else int(passes),
    )  # fmt: skip
    scale = (float(crop_scale[0]), float(crop_scale[1]))
    return PretrainDataset(
        Path(root), source, int(input_size), scale, rank, world_size, reduced_decode, return_keys
    )


def _check_settings(
    kind: str,
    filters: FilterConfig,
    json_root: str | Path | None,
    input_size: int,
    crop_scale: tuple[float, float],
    seed: int,
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
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if passes is not None and int(passes) < 1:
        raise ValueError(f"passes must be >= 1 or None, got {passes}")


def _check_buffer(shuffle_buffer: int, shuffle_buffer_mb: float, shard_interleave: int) -> None:
    """ValueError for a negative buffer, a buffer without bytes, or no open shard."""
    if int(shuffle_buffer) < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if not float(shuffle_buffer_mb) > 0:
        raise ValueError(f"shuffle_buffer_mb must be positive, got {shuffle_buffer_mb}")
    if int(shard_interleave) < 1:
        raise ValueError(f"shard_interleave must be >= 1, got {shard_interleave}")
