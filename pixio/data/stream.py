"""One reader's stream of *encoded* samples: shard plan -> interleaved shard reads -> filters ->
shuffle buffer of encoded bytes (bounded by count and bytes).

Nothing here decodes an image, so the stream up to any position can be replayed cheaply: a resume
re-reads bytes instead of re-decoding (docs/data.md, "Shuffle" and "Resume").
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixio.data.counters import ShardReport, SkipCounter
from pixio.data.filters import FilterConfig, ShardFilter, open_shard_filter
from pixio.data.plan import (
    TAG_SHUFFLE,
    TAG_SOFT,
    Reader,
    ShardRead,
    StreamKey,
    reader_entropy,
    reads_per_pass,
    seeded,
    shard_plan,
)
from pixio.data.shards import read_shard

log = logging.getLogger("pixio.data")

# An endless stream whose reader keeps getting nothing would hang the DataLoader silently:
# fail after this many passes' worth of shard reads in a row without a usable sample.
MAX_EMPTY_PASSES = 20
# Samples read before the first one leaves the buffer; afterwards the buffer grows by one
# sample per sample delivered until it is full (webdataset's growth rule).
SHUFFLE_INITIAL = 128


@dataclass(slots=True)
class EncodedSample:
    """An image's bytes as stored, its key `shard#member.ext` and its shard."""

    key: str
    shard: str
    data: bytes


@dataclass(frozen=True)
class StreamSource:
    """What every reader's stream is made of (the dataset's settings)."""

    shards: list[Path]
    kind: str
    image_exts: tuple[str, ...]
    filters: FilterConfig
    json_root: Path | None
    seed: int
    shuffle_buffer: int  # samples
    shuffle_bytes: int  # encoded bytes
    interleave: int  # shards open at once per reader
    passes: int | None = None


def interleave(
    reads: Iterator[ShardRead], open_read: Callable[[ShardRead], Iterator[Any]], width: int
) -> Iterator[Any]:
    """Round-robin over up to `width` open shard reads; a finished read is replaced in its slot
    by the next planned one, so even the first samples come from `width` shards."""
    active = [open_read(r) for r in itertools.islice(reads, width)]
    slot = 0
    while active:
        slot %= len(active)
        try:
            item = next(active[slot])
        except StopIteration:
            following = next(reads, None)
            if following is None:
                del active[slot]
            else:
                active[slot] = open_read(following)
            continue
        yield item
        slot += 1


def bounded_shuffle(
    source: Iterator[EncodedSample],
    rng: random.Random,
    count: int,
    max_bytes: int,
    initial: int,
    owed: int | None = None,
) -> Iterator[EncodedSample]:
    """Random picks from a buffer of at most `count` samples and (beyond one sample) `max_bytes`.

    The buffer first fills to `initial`, then grows by one per sample handed out. With `owed`
    (samples this stream must still deliver) it stops reading once the buffer holds all that is
    owed, so little is left over when the epoch's stream is dropped. Every decision depends on
    the encoded samples only, never on decoding.
    """
    buf: list[EncodedSample] = []
    nbytes = position = 0
    exhausted = False
    while True:
        want = min(count, initial + position)
        if owed is not None:
            want = min(want, owed - position)
        while not exhausted and len(buf) < max(want, 1) and (nbytes < max_bytes or not buf):
            sample = next(source, None)
            if sample is None:
                exhausted = True
                break
            buf.append(sample)
            nbytes += len(sample.data)
        if not buf:
            return
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        sample = buf.pop()
        nbytes -= len(sample.data)
        position += 1
        yield sample


class EncodedStream:
    """One reader's encoded samples for one `StreamKey`; `position` counts samples handed out."""

    def __init__(
        self,
        source: StreamSource,
        reader: Reader,
        key: StreamKey,
        counter: SkipCounter,
        owed: int | None = None,
    ) -> None:
        self.source, self.reader, self.key, self.counter = source, reader, key, counter
        self.position = 0
        self.bytes_read = 0  # bytes of the samples taken from the tars (before filters)
        self._empty_reads = 0
        self._empty_limit = MAX_EMPTY_PASSES * reads_per_pass(
            source.kind, len(source.shards), reader
        )
        self._soft_rng = seeded(*reader_entropy(source.seed, key, reader, TAG_SOFT))
        shuffle_seed = seeded(*reader_entropy(source.seed, key, reader, TAG_SHUFFLE))
        plan = shard_plan(source.kind, source.shards, reader, source.seed, key, source.passes)
        samples = interleave(plan, self._read, source.interleave)
        initial = min(source.shuffle_buffer, SHUFFLE_INITIAL)
        self._it = bounded_shuffle(
            samples, random.Random(int(shuffle_seed.integers(2**62))), source.shuffle_buffer,
            source.shuffle_bytes, initial, owed,
        )  # fmt: skip

    def __iter__(self) -> EncodedStream:
        return self

    def __next__(self) -> EncodedSample:
        sample = next(self._it)
        self.position += 1
        return sample

    def skip(self, n: int) -> int:
        """Hand out `n` samples without decoding them (a resume); returns the bytes read.

        Skip counts are paused meanwhile: the process that delivered them counted them.
        """
        start, self.counter.muted = self.bytes_read, True
        try:
            for _ in itertools.islice(self, n):
                pass
        finally:
            self.counter.muted = False
        return self.bytes_read - start

    def _read(self, read: ShardRead) -> Iterator[EncodedSample]:
        """The kept samples of one planned read; problems counted, logged once per process."""
        report = ShardReport(str(read.shard), self.counter)
        produced = 0
        try:
            for item in self._kept(read, report):
                produced += 1
                self._empty_reads = 0
                yield item
        finally:
            report.close()
        if not produced:  # only reached when the read ran to its end
            self._report_empty(read)

    def _kept(self, read: ShardRead, report: ShardReport) -> Iterator[EncodedSample]:
        """Stride, image member, filters (none when the policy skips the whole shard)."""
        shard_filter = open_shard_filter(
            self.source.filters, read.shard, self.source.json_root, report, self._soft_rng
        )
        if shard_filter is None:
            return
        for i, sample in enumerate(read_shard(read.shard, report, read.start)):
            if i % read.stride == read.offset:
                item = self._encoded(sample, read.shard, shard_filter, report)
                if item is not None:
                    yield item

    def _encoded(
        self, sample: dict[str, Any], shard: Path, shard_filter: ShardFilter, report: ShardReport
    ) -> EncodedSample | None:
        """A webdataset sample -> EncodedSample, or None when it has no image or is filtered."""
        self.bytes_read += sum(len(v) for v in sample.values() if isinstance(v, bytes))
        key = sample["__key__"]
        ext = next((e for e in self.source.image_exts if e in sample), None)
        if ext is None:
            exts = "/.".join(self.source.image_exts)
            report.add("not_an_image", detail=f"{key}: no .{exts} member")
            return None
        if not shard_filter.keep(key, ext):
            return None
        return EncodedSample(f"{shard}#{key}.{ext}", str(shard), sample[ext])

    def _report_empty(self, read: ShardRead) -> None:
        """Warn once a pass's worth of reads gave nothing; fail after MAX_EMPTY_PASSES of them."""
        self._empty_reads += 1
        count, limit = self._empty_reads, self._empty_limit
        message = (
            f"reader {self.reader.index}/{self.reader.total}: {count} shard reads in a row over "
            f"{read.shard.parent} gave no usable sample (pass {read.pass_index}); "
            f"skips so far: {self.counter.totals()}"
        )
        if count >= limit:
            raise RuntimeError(message)
        if count == limit // MAX_EMPTY_PASSES:
            log.warning(message)
