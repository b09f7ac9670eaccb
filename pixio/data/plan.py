"""Who reads which shard: readers, per-epoch shard sequences and the seeds of every random choice.

A *reader* is one logical worker of one rank. Every reader of every rank walks the same endless
sequence of shard permutations (seeded by seed, epoch, salt, pass) at its own stride, so an epoch
reads every shard equally often whatever the reader count, and each reader opens only its own
shards. See docs/data.md, "Readers, splitting, order".
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Independent random streams per purpose, all derived from (seed, epoch, salt, ...).
TAG_ORDER, TAG_CROP, TAG_SOFT, TAG_SHUFFLE, TAG_ROTATE = range(5)


@dataclass(frozen=True)
class Reader:
    """Logical worker `worker` of `workers` on `rank` of `world_size`."""

    rank: int
    worker: int
    workers: int
    world_size: int

    @property
    def index(self) -> int:
        """Position among all readers of the job."""
        return self.rank * self.workers + self.worker

    @property
    def total(self) -> int:
        """Readers in the job (world size x workers per rank)."""
        return self.world_size * self.workers


@dataclass(frozen=True)
class StreamKey:
    """Which stream of a reader: the epoch's (`salt` 0) or a fresh one for the rest of an epoch
    resumed without usable state (`salt` = the iteration it starts at)."""

    epoch: int
    salt: int = 0


@dataclass(frozen=True)
class ShardRead:
    """One planned read of `shard` in pass `pass_index`, keeping samples `offset::stride`,
    starting at the fraction `start` of the shard's samples and wrapping round.

    A reader rarely reads a shard to its end before its epoch's stream is dropped (8 shards
    interleaved, ~1-2 shards' worth per reader and epoch at scale): a random start per read makes
    every sample of a shard equally likely to be read, instead of always the shard's head."""

    shard: Path
    pass_index: int
    stride: int = 1
    offset: int = 0
    start: float = 0.0


def seeded(*entropy: int) -> np.random.Generator:
    """A numpy generator seeded by a tuple of non-negative integers."""
    return np.random.default_rng(list(entropy))


def reader_entropy(seed: int, key: StreamKey, reader: Reader, tag: int) -> tuple[int, ...]:
    """The seed tuple of one reader's random stream for one purpose."""
    return (seed, key.epoch, key.salt, reader.rank, reader.worker, reader.workers, tag)


def pass_order(seed: int, key: StreamKey, pass_index: int, n_shards: int) -> np.ndarray:
    """The shard permutation of one pass, shared by all readers of the job."""
    return seeded(seed, key.epoch, key.salt, pass_index, TAG_ORDER).permutation(n_shards)


def read_start(seed: int, key: StreamKey, *where: int) -> float:
    """Where in its shard a planned read starts (a fraction in [0, 1)), from the read's place."""
    return float(seeded(seed, key.epoch, key.salt, *where, TAG_ROTATE).random())


def sequence_plan(
    shards: list[Path], reader: Reader, seed: int, key: StreamKey, passes: int | None
) -> Iterator[ShardRead]:
    """Reader i reads positions i, i + total, i + 2 total... of the concatenated permutations.

    Each sequence position belongs to exactly one reader, so a pass's shards are each read
    once by the job, and any prefix of the sequence holds every shard equally often (+-1).
    """
    n = len(shards)
    order, order_pass = np.empty(0, dtype=np.int64), -1
    for g in itertools.count(reader.index, reader.total):
        pass_index = g // n
        if passes is not None and pass_index >= passes:
            return
        if pass_index != order_pass:
            order, order_pass = pass_order(seed, key, pass_index, n), pass_index
        yield ShardRead(shards[int(order[g % n])], pass_index, start=read_start(seed, key, g))


def split_plan(
    shards: list[Path], reader: Reader, seed: int, key: StreamKey, passes: int | None
) -> Iterator[ShardRead]:
    """Fewer shards than readers (web): per pass, shard slot i % n is shared by the readers
    i, i + n, ...; each keeps every c-th sample (c readers on the slot) and opens only it."""
    n = len(shards)
    slot, offset = reader.index % n, reader.index // n
    sharing = len(range(slot, reader.total, n))
    for p in itertools.count() if passes is None else range(passes):
        shard = shards[int(pass_order(seed, key, p, n)[slot])]
        # The readers sharing the slot start at the same place, so their strides stay disjoint.
        yield ShardRead(shard, p, sharing, offset, read_start(seed, key, p, slot, n))


def shard_plan(
    kind: str, shards: list[Path], reader: Reader, seed: int, key: StreamKey, passes: int | None
) -> Iterator[ShardRead]:
    """The reader's shard reads: `split_plan` for web data with fewer shards than readers (every
    kept sample once per pass), `sequence_plan` otherwise."""
    plan = split_plan if kind == "web" and len(shards) < reader.total else sequence_plan
    return plan(shards, reader, seed, key, passes)


def reads_per_pass(kind: str, n_shards: int, reader: Reader) -> int:
    """How many reads a reader makes per pass (at least 1)."""
    if kind == "web" and n_shards < reader.total:
        return 1
    return max(1, math.ceil(n_shards / reader.total))


@dataclass(frozen=True)
class Cursor:
    """Where a logical worker's stream stands: its epoch, the iteration the stream started at
    (the epoch's first iteration, or a later one for a fresh resumed stream) and the number of
    encoded samples it has handed out (decode failures included)."""

    epoch: int
    start: int
    position: int = 0


@dataclass(frozen=True)
class BatchPlan:
    """What a loader asks of its workers: batch n of the run is iteration start_iteration + n,
    made by logical worker iteration % workers; `cursors[w]` is where worker w's first stream
    stands."""

    batch_size: int
    workers: int
    iters_per_epoch: int
    start_iteration: int
    cursors: tuple[Cursor, ...]

    def first_iteration(self, worker: int, start: int | None = None) -> int:
        """The first iteration >= `start` (default: start_iteration) made by `worker`."""
        start = self.start_iteration if start is None else start
        return start + (worker - start) % self.workers

    def key(self, cursor: Cursor) -> StreamKey:
        """The stream of a cursor: salted when it started inside its epoch."""
        salt = 0 if cursor.start == cursor.epoch * self.iters_per_epoch else cursor.start
        return StreamKey(cursor.epoch, salt)

    def owed(self, worker: int, cursor: Cursor) -> int:
        """Images the cursor's stream delivers: batch_size x the worker's iterations in it."""
        end = (cursor.epoch + 1) * self.iters_per_epoch
        first = self.first_iteration(worker, cursor.start)
        return self.batch_size * len(range(first, end, self.workers))


def batch_plan(
    batch_size: int,
    workers: int,
    iters_per_epoch: int,
    start: int,
    saved: list[Cursor] | None = None,
) -> BatchPlan:
    """The plan for a run starting at iteration `start`.

    With `saved` cursors (a checkpoint of the same layout taken at `start`) each worker goes on
    where it stood; without, a worker whose next batch lies in the epoch of `start` gets a fresh
    stream salted by `start` (the epoch's own stream when `start` opens the epoch).
    """
    cursors = []
    for worker in range(workers):
        proto = BatchPlan(batch_size, workers, iters_per_epoch, start, ())
        epoch = proto.first_iteration(worker) // iters_per_epoch
        if saved is not None and saved[worker].epoch == epoch:
            cursors.append(saved[worker])
        else:
            same_epoch = epoch == start // iters_per_epoch and saved is None
            cursors.append(Cursor(epoch, start if same_epoch else epoch * iters_per_epoch))
    return BatchPlan(batch_size, workers, iters_per_epoch, start, tuple(cursors))
