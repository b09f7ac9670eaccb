"""A data loader whose whole stream is a function of (seed, epoch).

The trainer calls `set_epoch(e)` then iterates; the DataLoader's own generator is re-seeded per
epoch so that creating an iterator never consumes the global RNG (masking and drop path draw from
it) and a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class EpochLoader:
    """`DataLoader` over an iterable dataset with `set_epoch` (deterministic per epoch)."""

    def __init__(
        self, dataset: Any, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False
    ) -> None:
        self.dataset = dataset
        self.seed = seed
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=True,
            generator=self.generator,
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's stream (dataset shuffles and worker seeds)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.generator.manual_seed(self.seed * 100_003 + epoch)

    def skip_counts(self) -> dict[str, int]:
        """Samples the pipeline dropped, by reason (empty when the dataset does not count)."""
        counts = getattr(self.dataset, "skip_counts", None)
        return counts() if counts else {}

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)
