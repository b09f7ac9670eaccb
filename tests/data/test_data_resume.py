"""EpochLoader: one iterator for the run, exact mid-epoch resume without decoding the skipped
part, fresh (logged) streams when the layout changed, nothing decoded is thrown away."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from test_data_helpers import image_bytes, web_shards, write_tar

import pixio.data.pipeline as pipeline
from pixio.data import build_pretrain_dataset
from pixio.runtime.loader import PREFETCH_FACTOR, EpochLoader

IPE, BATCH, SIZE = 5, 4, 16


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """4 good web shards of 10 images and 2 where every other image is truncated."""
    web_shards(tmp_path, 4, 10)
    good = image_bytes(seed=1)
    for b in range(2):
        samples = [
            {"__key__": f"9{b}{i:02d}", "jpeg": good[: len(good) // 2] if i % 2 else image_bytes(seed=900 + i)}
            for i in range(10)
        ]  # fmt: skip
        write_tar(tmp_path / "a" / f"bad{b}.tar", samples)
    return tmp_path


def make(root: Path, workers: int, batch: int = BATCH) -> tuple[object, EpochLoader]:
    ds = build_pretrain_dataset(root, kind="web", input_size=SIZE, shuffle_buffer=20)
    return ds, EpochLoader(ds, batch, workers, seed=0, iters_per_epoch=IPE)


def take(loader: EpochLoader, start: int, n: int) -> list[torch.Tensor]:
    """n batches from iteration `start`, then the iterator (and its workers) is closed."""
    it = loader.iterate(start)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def count_decodes(monkeypatch) -> torch.Tensor:
    """Calls of decode_crop per process (row 0 main, 1 + w worker w), shared with forked workers."""
    calls = torch.zeros(8, dtype=torch.int64).share_memory_()
    real = pipeline.decode_crop

    def decode_crop(*args, **kwargs):
        info = torch.utils.data.get_worker_info()
        calls[0 if info is None else 1 + info.id] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "decode_crop", decode_crop)
    return calls


def failures(ds) -> int:
    counts = ds.skip_counts()
    return counts["corrupt_image"] + counts["not_an_image"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [3, 7], ids=["mid_epoch", "after_an_epoch_boundary"])
def test_resume_is_exact_and_skips_without_decoding(root, monkeypatch, workers: int, k: int):
    total = 13  # the resumed part crosses the boundary at iteration 10 as well
    _, full = make(root, workers)
    expected = take(full, 0, total)
    ds_a, first = make(root, workers)
    assert all(torch.equal(a, b) for a, b in zip(take(first, 0, k), expected, strict=False))
    assert failures(ds_a) > 0  # corrupt images were met before the interruption
    state = first.state_dict()
    assert state["iteration"] == k and state["rotation"] == k % max(1, workers)

    calls = count_decodes(monkeypatch)
    ds_b, resumed = make(root, workers)
    resumed.load_state_dict(state)
    rest = take(resumed, k, total - k)
    assert len(rest) == total - k
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[k:], strict=True))
    counts = ds_b.stream_counts()
    replayed = sum(position for _, _, position in state["cursors"])
    assert counts["replayed"] == replayed > 0 and counts["replayed_bytes"] > 0
    # Every decode of the resumed process made a delivered image or a counted failure:
    # none of the `replayed` skipped samples was decoded.
    assert int(calls.sum()) == counts["decoded"] == counts["delivered"] + failures(ds_b)


def test_batches_are_uint8_and_iterations_follow_on(root) -> None:
    _, loader = make(root, 0)
    batches = take(loader, 0, 3)
    assert all(b.shape == (BATCH, 3, SIZE, SIZE) and b.dtype == torch.uint8 for b in batches)
    assert loader.state_dict()["iteration"] == 3


@pytest.mark.timeout(60)
def test_no_decoded_image_is_dropped_at_epoch_boundaries(root) -> None:
    workers, n = 2, 2 * IPE + 1
    ds, loader = make(root, workers)
    it = loader.iterate(0)
    got = [next(it) for _ in range(n)]
    it.close()  # workers stop: the counts are final
    counts = ds.stream_counts()
    in_flight = counts["decoded"] - failures(ds) - len(got) * BATCH
    # Beyond what was handed out, only the DataLoader's prefetch window (and a batch being
    # built per worker) was decoded: no shuffle buffer or prefetched epoch thrown away.
    assert 0 <= in_flight <= (PREFETCH_FACTOR + 1) * workers * BATCH
    assert counts["decoded"] == counts["delivered"] + failures(ds)


def test_changed_layout_gives_a_fresh_stream_and_says_why(root, caplog) -> None:
    _, first = make(root, 0)
    take(first, 0, 3)
    state = first.state_dict()
    resumed = []
    for _ in range(2):
        _, loader = make(root, 0, batch=2)
        loader.load_state_dict(state)
        with caplog.at_level(logging.WARNING, logger="pixio.data"):
            resumed.append(take(loader, 3, 4))
    lines = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert len(lines) == 2 and "batch_size 4 -> 2" in lines[0]
    assert "fresh stream for the rest of epoch 0" in lines[0]
    assert all(torch.equal(a, b) for a, b in zip(*resumed, strict=True))  # deterministic
    _, plain = make(root, 0, batch=2)
    uninterrupted = take(plain, 0, 7)[3:]
    assert not all(torch.equal(a, b) for a, b in zip(resumed[0], uninterrupted, strict=True))


@pytest.mark.parametrize(
    "start, state_at, says",
    [(3, None, "no saved loader state"), (4, 3, "saved state is at iteration 3, not 4")],
)
def test_resume_without_a_usable_state_is_logged(root, caplog, start, state_at, says) -> None:
    _, loader = make(root, 0)
    if state_at is not None:
        _, first = make(root, 0)
        take(first, 0, state_at)
        loader.load_state_dict(first.state_dict())
    with caplog.at_level(logging.WARNING, logger="pixio.data"):
        assert len(take(loader, start, 2)) == 2
    (line,) = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert f"resuming at iteration {start}" in line and says in line


def test_resume_at_an_epoch_boundary_needs_no_state(root) -> None:
    _, full = make(root, 0)
    expected = take(full, 0, 2 * IPE)
    _, resumed = make(root, 0)
    rest = take(resumed, IPE, IPE)
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[IPE:], strict=True))


def test_state_is_plain_and_survives_a_weights_only_checkpoint(root) -> None:
    _, loader = make(root, 0)
    take(loader, 0, 2)
    state = loader.state_dict()
    buf = io.BytesIO()
    torch.save({"data": [state, state]}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["data"][0] == state
    assert set(state) >= {"iteration", "layout", "cursors", "rotation"}
    assert set(state["layout"]) >= {"world_size", "num_workers", "batch_size", "iters_per_epoch", "seed"}  # fmt: skip
