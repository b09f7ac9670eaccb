"""The trainer's view of its data: the epoch length, (iteration, batch) pairs from any start, and
the fetch one batch ahead of the step.

Data is a loader with `iterate(start)` (`EpochLoader` for streams, `MapLoader` for finite
datasets: both resume mid-epoch exactly and need nothing here) or any re-iterable of batches
(one pass per epoch; a mid-epoch resume produces and drops the skipped batches).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pixio.runtime.config import ConfigError


@dataclass
class Fetched:
    """One fetch: (iteration, batch), None at the end, or the error the fetch raised (a dead
    data-loader worker, a failed read), and how long it waited."""

    item: tuple[int, Any] | None
    failure: Exception | None = None
    seconds: float = 0.0


def fetch(batches: Iterator[tuple[int, Any]], wanted: bool = True) -> Fetched:
    """The next (iteration, batch) when `wanted` (else the end), timed. A failed fetch's error
    is returned, not raised, for the trainer's stop check to share with every rank."""
    if not wanted:
        return Fetched(None)
    tick = time.perf_counter()
    try:
        item, failure = next(batches), None
    except StopIteration:
        item, failure = None, None
    except Exception as err:  # not KeyboardInterrupt: a second Ctrl-C exits at once
        item, failure = None, err
    return Fetched(item, failure, time.perf_counter() - tick)


def iters_per_epoch(configured: int | None, data: Iterable) -> int:
    """`train.iters_per_epoch`, or the length of finite data when that is null. A finite loader
    (`MapLoader`) runs its own epochs, so a configured length must equal it; a plain
    re-iterable may be cut shorter (each epoch then uses its first batches), never longer."""
    length = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    if configured is None:
        if length is None:
            raise ConfigError("train.iters_per_epoch: required for a stream (it has no length)")
        if length == 0:
            raise ConfigError("train.iters_per_epoch: the training data has no batch")
        return length
    if length is not None and (
        configured > length or hasattr(data, "iterate") and configured != length
    ):
        raise ConfigError(
            f"train.iters_per_epoch: {configured}, but the data has {length} batches per "
            "epoch (leave it null to take the data's length)"
        )
    return configured


def iteration_batches(
    data: Any, start: int, per_epoch: int, epochs: int
) -> Iterator[tuple[int, Any]]:
    """(iteration, batch) from `start` until `epochs` epochs of `per_epoch` iterations end."""
    if hasattr(data, "iterate"):  # a loader that resumes itself (EpochLoader, MapLoader)
        return zip(range(start, epochs * per_epoch), data.iterate(start), strict=False)
    return _epoch_batches(data, start, per_epoch, epochs)


def _epoch_batches(
    data: Iterable, start: int, per_epoch: int, epochs: int
) -> Iterator[tuple[int, Any]]:
    """A plain re-iterable: one pass per epoch (`set_epoch` first, when it has one); a
    mid-epoch resume fast-forwards (the skipped batches are produced and dropped, so keep such
    data cheap)."""
    for epoch in range(start // per_epoch, epochs):
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        first, done = epoch * per_epoch, 0
        for n, batch in enumerate(data):
            it = first + n
            done = n + 1
            if it >= start:
                yield it, batch
            if done == per_epoch:
                break
        if done < per_epoch:
            raise RuntimeError(
                f"the data ran out after {done} batches in epoch {epoch}; an epoch is "
                f"{per_epoch} iterations (train.iters_per_epoch)"
            )
