"""One process does a piece of work for the whole job: rank 0 computes, every rank gets the
result, or every rank raises rank 0's error (so none waits for a broadcast that never comes)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from pixio.runtime.distributed import get_rank, is_dist

T = TypeVar("T")


def rank0_result(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0 only (e.g. hashing a 22 GB checkpoint once per job, not once per
    rank); its result, which must be small and picklable, is broadcast to every rank. An
    exception on rank 0 is raised there and, as the same exception, on every other rank."""
    if not is_dist():
        return compute()
    box: list[object] = [None, None]
    error = None
    if get_rank() == 0:
        try:
            box[0] = compute()
        except Exception as err:  # every rank must learn of it
            box[1] = _portable(err)
            error = err
    dist.broadcast_object_list(box, src=0)
    if error is not None:  # rank 0 keeps its own exception, traceback included
        raise error
    if box[1] is not None:
        raise box[1]  # type: ignore[misc]
    return box[0]  # type: ignore[return-value]


def _portable(err: Exception) -> Exception:
    """`err` if it survives pickling as itself (the broadcast pickles it), else a RuntimeError
    with its type and message (an exception whose constructor takes other arguments)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
