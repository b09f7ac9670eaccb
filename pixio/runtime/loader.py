"""The run-long data loader: one DataLoader iterator for the whole run, exact mid-epoch resume.

Batch n of an iterator started at iteration s is iteration s + n. DataLoader hands batch n to
worker n % W, so DataLoader worker j plays *logical* worker (j + s) % W and iteration i is
always made by logical worker i % W, whatever the start. Each logical worker knows which
iterations it owes in each epoch and switches to the next epoch's stream by itself, so
prefetched batches are never dropped at an epoch boundary. Every batch carries its worker's
stream position; `state_dict` keeps, per logical worker, the position after the last batch
handed out (or before one of the last `UNDO_DEPTH` batches: a trainer may hold a fetched batch
and a prefetched one it has not used), and a resumed run re-reads (without decoding) each
worker's encoded stream up to it. Batches are uint8 images (docs/data.md); the device
normalises them. See docs/data.md, "Resume". The workers leave stop signals to the trainer
(`pixio.runtime.preemption.SignalSafeLoader`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pixio.data.plan import BatchPlan, Cursor, batch_plan
from pixio.runtime.preemption import SignalSafeLoader

log = logging.getLogger("pixio.data")

STATE_VERSION = 1
LAYOUT_KEYS: tuple[str, ...] = (
    "world_size",
    "num_workers",
    "batch_size",
    "iters_per_epoch",
    "seed",
    "stream",
)
PREFETCH_FACTOR = 2  # batches in flight per worker
# Batches a state can be taken back: the one the trainer fetched and did not use, and the one
# pixio.runtime.prefetch.DevicePrefetcher fetched ahead of it on CUDA.
UNDO_DEPTH = 2


class _WorkerBatches(IterableDataset):
    """What each DataLoader worker iterates: its logical worker's batches."""

    def __init__(self, dataset: Any, plan: BatchPlan) -> None:
        super().__init__()
        self.dataset, self.plan = dataset, plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = (0 if info is None else info.id) + self.plan.start_iteration
        return self.dataset.worker_batches(self.plan, worker % self.plan.workers)


class EpochLoader:
    """Endless batches of a `PretrainDataset` (or any dataset with `worker_batches`, `rank`,
    `world_size`, `fingerprint`) for iterations start, start + 1, ...; see the module doc."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_workers: int,
        seed: int,
        iters_per_epoch: int,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or iters_per_epoch < 1 or num_workers < 0:
            raise ValueError(
                f"need batch_size >= 1, iters_per_epoch >= 1, num_workers >= 0; got "
                f"{batch_size}, {iters_per_epoch}, {num_workers}"
            )
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.seed, self.iters_per_epoch, self.pin_memory = seed, iters_per_epoch, pin_memory
        self.workers = max(1, num_workers)  # num_workers=0 runs logical worker 0 in-process
        self._saved: dict[str, Any] | None = None
        self._iteration = 0
        # The last batches' (worker, that worker's cursor before the batch), newest last.
        self._undo: deque[tuple[int, Cursor]] = deque(maxlen=UNDO_DEPTH)
        self._cursors: list[Cursor] = list(batch_plan(batch_size, self.workers, iters_per_epoch, 0).cursors)  # fmt: skip

    def layout(self) -> dict[str, Any]:
        """What must be unchanged for an exact resume."""
        return {
            "world_size": int(self.dataset.world_size),
            "num_workers": self.workers,
            "batch_size": self.batch_size,
            "iters_per_epoch": self.iters_per_epoch,
            "seed": self.seed,
            "stream": str(self.dataset.fingerprint()),
        }

    def state_dict(self, iteration: int | None = None) -> dict[str, Any]:
        """This rank's stream position after the last batch `iterate` yielded, or, with an
        `iteration` up to UNDO_DEPTH less, before the batches after it: a trainer that fetched
        a batch (and prefetched the next) and then stopped without using them saves where the
        first of them starts again (plain ints, lists and strs: it goes into a weights_only
        checkpoint)."""
        at, cursors = self._iteration, list(self._cursors)
        back = 0 if iteration is None else at - iteration
        if not 0 <= back <= len(self._undo):
            raise ValueError(f"loader state is at iteration {at}, cannot give {iteration}")
        for worker, cursor in list(self._undo)[len(self._undo) - back :][::-1]:
            cursors[worker] = cursor  # newest first: a worker's oldest cursor wins
        at -= back
        return {
            "version": STATE_VERSION,
            "iteration": at,
            "rotation": at % self.workers,
            "layout": self.layout(),
            "cursors": [[c.epoch, c.start, c.position] for c in cursors],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep `state` for the next `iterate` (used there if its layout and iteration match)."""
        self._saved = dict(state)

    def skip_counts(self) -> dict[str, int]:
        """Samples the pipeline dropped, by reason (empty when the dataset does not count)."""
        counts = getattr(self.dataset, "skip_counts", None)
        return counts() if counts else {}

    def iterate(self, start_iteration: int) -> Iterator[Any]:
        """Batches for iterations start_iteration, start_iteration + 1, ... (endless; the
        trainer stops). Batch i belongs to epoch i // iters_per_epoch. One DataLoader iterator
        for the whole run. A state from `load_state_dict` with the same layout and
        iteration == start_iteration continues exactly (skipped samples are re-read, not
        decoded); otherwise, for start_iteration > 0, the rest of that epoch comes from a fresh
        stream and logger `pixio.data` says why."""
        plan = self._plan(start_iteration)
        self._iteration, self._cursors = start_iteration, list(plan.cursors)
        self._undo.clear()
        for batch, meta in self._dataloader(plan):
            iteration, worker, epoch, start, position = (int(v) for v in meta)
            if iteration != self._iteration:  # DataLoader's round-robin order was broken
                raise RuntimeError(f"expected iteration {self._iteration}, got {iteration}")
            self._undo.append((worker, self._cursors[worker]))
            self._cursors[worker] = Cursor(epoch, start, position)
            self._iteration = iteration + 1
            yield batch

    def _dataloader(self, plan: BatchPlan) -> DataLoader:
        """The run's one DataLoader (its own generator: never consumes the global RNG)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + plan.start_iteration)
        return SignalSafeLoader(
            _WorkerBatches(self.dataset, plan),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
            prefetch_factor=PREFETCH_FACTOR if self.num_workers > 0 else None,
        )

    def _plan(self, start: int) -> BatchPlan:
        """The saved cursors when usable, else fresh streams (logged when resuming)."""
        why = self._unusable(start)
        saved = None if why else [Cursor(*c) for c in self._saved["cursors"]]  # type: ignore[index]
        if why and start > 0:
            epoch, into = divmod(start, self.iters_per_epoch)
            what = (
                f"a fresh stream for the rest of epoch {epoch} ({into} iterations in)"
                if into
                else f"epoch {epoch}'s stream from its start"
            )
            log.warning("data: resuming at iteration %d with %s: %s", start, what, why)
        return batch_plan(self.batch_size, self.workers, self.iters_per_epoch, start, saved)

    def _unusable(self, start: int) -> str | None:
        """Why the loaded state cannot continue the stream exactly at `start` (None: it can)."""
        state = self._saved
        if state is None:
            return "no saved loader state"
        if state.get("version") != STATE_VERSION:
            return f"loader state version {state.get('version')} is not {STATE_VERSION}"
        saved, now = state.get("layout", {}), self.layout()
        changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in LAYOUT_KEYS if saved.get(k) != now[k]]  # fmt: skip
        if changed:
            return "layout changed: " + ", ".join(changed)
        if state.get("iteration") != start:
            return f"the saved state is at iteration {state.get('iteration')}, not {start}"
        return None
