"""EpochLoader's state up to two batches back: a trainer that fetched a batch (and, on CUDA,
prefetched the next) and then stopped without using them saves the position where the first of
them starts again, and a resume from it delivers them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_helpers import web_shards

from pixio.data import build_pretrain_dataset
from pixio.runtime.loader import EpochLoader

pytestmark = pytest.mark.timeout(60)


def _loader(root: Path) -> EpochLoader:
    ds = build_pretrain_dataset(root, kind="web", input_size=16, shuffle_buffer=8)
    return EpochLoader(ds, 2, 2, seed=0, iters_per_epoch=4)


def test_the_state_one_batch_back_resumes_at_the_batch_that_was_not_used(tmp_path) -> None:
    web_shards(tmp_path, 2, 8)
    loader = _loader(tmp_path)
    batches = loader.iterate(0)
    seen, states = [], []
    for _ in range(6):  # across the epoch boundary at 4
        seen.append(next(batches))
        states.append(loader.state_dict())
    batches.close()
    back = loader.state_dict(5)  # batch 5 (the sixth) fetched, then the trainer stopped
    assert back == states[4] and back["iteration"] == 5 and back != states[5]
    assert loader.state_dict(6) == states[5] == loader.state_dict()
    two_back = loader.state_dict(4)  # batch 4 fetched, batch 5 prefetched, the trainer stopped
    assert two_back == states[3] and two_back["iteration"] == 4
    with pytest.raises(ValueError, match="cannot give 3"):
        loader.state_dict(3)  # at most UNDO_DEPTH = 2 batches can be handed back

    for state, start in ((back, 5), (two_back, 4)):
        resumed = _loader(tmp_path)
        resumed.load_state_dict(state)
        again = resumed.iterate(start)
        assert all(torch.equal(next(again), seen[i]) for i in range(start, 6))
        again.close()
