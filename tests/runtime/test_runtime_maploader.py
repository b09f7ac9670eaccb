"""Finite map-style loaders: per-epoch rank split, exact mid-epoch resume, worker-independent
augmentation, and validation that covers every sample exactly once."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from pixio.runtime.maploader import EvalLoader, MapLoader


class Noisy(Dataset):
    """Sample i = (i, a random draw): the draw stands for an augmentation."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, float]:
        return i, torch.rand(()).item()


def take(loader: MapLoader, start: int, count: int) -> list[tuple[list[int], list[float]]]:
    batches = itertools.islice(loader.iterate(start), count)
    return [(index.tolist(), draw.tolist()) for index, draw in batches]


def test_each_epoch_splits_a_permutation_over_ranks_in_full_batches():
    n, world, batch = 23, 2, 3
    loaders = [MapLoader(Noisy(n), batch, rank, world, seed=5) for rank in range(world)]
    assert len(loaders[0]) == (n // world) // batch == 3
    for epoch in range(2):
        seen = [
            i for loader in loaders for idx, _ in take(loader, epoch * 3, 3) for i in idx
        ]  # every rank's batches of this epoch
        assert len(seen) == len(set(seen)) == world * 3 * batch  # disjoint, no repeats
    first, second = (take(loaders[0], e * 3, 3) for e in range(2))
    assert [b[0] for b in first] != [b[0] for b in second]  # reshuffled per epoch


def test_mid_epoch_resume_gives_the_same_batches_and_draws():
    loader = MapLoader(Noisy(20), 4, seed=1)  # 5 batches per epoch
    run = take(loader, 0, 12)
    assert take(MapLoader(Noisy(20), 4, seed=1), 7, 5) == run[7:]


def test_draws_do_not_depend_on_the_worker_count_or_touch_the_callers_rng():
    torch.manual_seed(0)
    expected_next = torch.rand(()).item()
    torch.manual_seed(0)
    inline = take(MapLoader(Noisy(16), 4, seed=2), 0, 8)
    assert torch.rand(()).item() == expected_next  # num_workers=0 restores the caller's stream
    workers = take(MapLoader(Noisy(16), 4, num_workers=2, seed=2), 0, 8)
    assert workers == inline


def test_too_small_a_dataset_is_refused():
    with pytest.raises(ValueError, match="gives no full batch of 4 per process on 2 processes"):
        MapLoader(Noisy(7), 4, 0, 2)


@pytest.mark.parametrize(("n", "world", "batch"), [(11, 2, 3), (5, 8, 2), (12, 3, 4)])
def test_eval_loader_covers_every_sample_exactly_once(n, world, batch):
    counts = [0] * n
    batches = []
    for rank in range(world):
        loader = EvalLoader(Noisy(n), batch, rank, world)
        batches.append(len(loader))
        for (index, _), real in loader:
            for i, r in zip(index.tolist(), real.tolist(), strict=True):
                counts[i] += int(r)
    assert counts == [1] * n
    assert len(set(batches)) == 1  # every rank runs the same number of batches
