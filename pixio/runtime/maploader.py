"""Loaders for finite map-style datasets (evaluation heads, fine-tuning), beside the endless
pre-training streams of `pixio.runtime.loader`.

`MapLoader` (training): every epoch a seeded permutation of the dataset, split over ranks with
equal counts (the remainder after the split is dropped, a different one each epoch), cut into
full batches; its epoch length is taken from the data. Each sample's augmentation randomness is
seeded by (seed, epoch, index), so results do not depend on the worker count, and a mid-epoch
resume skips sampler positions: nothing is loaded for the skipped batches and the batches that
follow are exactly those of an uninterrupted run.

`EvalLoader` (validation): every sample exactly once over all ranks. Rank r takes positions
r, r + W, ... of the set padded to a multiple of W (with repeats); each batch comes with a `real`
mask so the padding never counts, while every rank runs the same number of batches (sharded
models need every rank in every forward).

Both leave stop signals to the trainer: their workers ignore them
(`pixio.runtime.preemption.SignalSafeLoader`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info

from pixio.runtime.preemption import SignalSafeLoader


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of one sample's augmentations in one epoch."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class _EpochSampler(Sampler):
    """This rank's (epoch, index) keys for one epoch, from position `skip` on."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = n // world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the whole epoch."""
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return order[self.rank : self.per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices()[self.skip :]:
            yield self.epoch, int(index)

    def __len__(self) -> int:
        return self.per_rank - self.skip


class _Seeded(Dataset):
    """Seeds python, numpy and torch from (seed, epoch, index) before reading a sample. In the
    main process (num_workers=0) the training's own random streams are put back afterwards."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        in_main = get_worker_info() is None
        saved = (
            (random.getstate(), np.random.get_state(), torch.get_rng_state()) if in_main else None
        )
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class MapLoader:
    """Batches of a finite map-style dataset for iterations start, start + 1, ... (epochs follow
    each other without end; the trainer stops). See the module doc."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        self.sampler = _EpochSampler(n, rank, world_size, seed, shuffle)
        self.batch_size = batch_size
        self.batches_per_epoch = self.sampler.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"a dataset of {n} samples gives no full batch of {batch_size} per process "
                f"on {world_size} processes"
            )
        self.loader = SignalSafeLoader(
            _Seeded(dataset, seed), batch_size=batch_size, sampler=self.sampler,
            num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory,
            drop_last=True, persistent_workers=num_workers > 0,
            # Its own generator: a DataLoader iterator draws a base seed, which would otherwise
            # come from (and shift) the training's global random stream.
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    def __len__(self) -> int:
        """Iterations per epoch."""
        return self.batches_per_epoch

    def iterate(self, start_iteration: int) -> Iterator[Any]:
        """Batches for iterations `start_iteration`, `start_iteration + 1`, ..."""
        epoch, batch = divmod(start_iteration, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, skip=batch * self.batch_size)
            yield from self.loader
            epoch, batch = epoch + 1, 0


class _Padded(Dataset):
    """Position p -> (sample p mod n, whether p < n)."""

    def __init__(self, dataset: Sized) -> None:
        self.dataset, self.n = dataset, len(dataset)

    def __getitem__(self, position: int) -> tuple[Any, bool]:
        return self.dataset[position % self.n], position < self.n  # type: ignore[index]


class _PairCollate:
    """[(sample, real), ...] -> (collated samples, (B,) bool tensor); a class, so it pickles."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[Any, bool]]) -> tuple[Any, torch.Tensor]:
        return self.collate([s for s, _ in items]), torch.tensor([r for _, r in items])


class EvalLoader:
    """(batch, real) pairs covering a finite dataset once over all ranks; `real` is a (B,) bool
    tensor, False for the padding. See the module doc."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.n = len(dataset)  # type: ignore[arg-type]
        if self.n == 0:
            raise ValueError("the validation set is empty")
        padded = -(-self.n // world_size) * world_size
        positions = list(range(rank, padded, world_size))
        self.loader = SignalSafeLoader(
            _Padded(dataset), batch_size=batch_size, sampler=positions, num_workers=num_workers,
            collate_fn=_PairCollate(collate_fn or default_collate),
            generator=torch.Generator(),  # not the training's stream (see MapLoader)
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        return iter(self.loader)
