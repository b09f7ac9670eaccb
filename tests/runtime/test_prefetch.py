"""DevicePrefetcher: a pass-through on the CPU; on CUDA (here: its code path with recording
stand-ins for the streams, this machine has no GPU) one item ahead, the consuming stream made
to wait before an item is handed out, errors raised at their own item; and a pre-training run
stopped by SIGTERM with the lookahead resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch
from tests_helpers import CPU_OVERRIDES, compose_pretrain

from pixio.runtime.prefetch import DevicePrefetcher

pytestmark = pytest.mark.timeout(300)


class Source:
    """Items 0..n-1 (item `fail` raises instead), counting how many were taken."""

    def __init__(self, n: int, fail: int | None = None) -> None:
        self.n, self.fail, self.taken = n, fail, 0

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.taken == self.n:
            raise StopIteration
        self.taken += 1
        if self.taken - 1 == self.fail:
            raise OSError(f"item {self.fail} is unreadable")
        return self.taken - 1


class FakeStream:
    """Records what the prefetcher asks of the CUDA streams."""

    device = None

    def __init__(self, events: list[str], name: str) -> None:
        self.events, self.name = events, name

    def wait_stream(self, other: FakeStream) -> None:
        self.events.append(f"{self.name} waits for {other.name}")


@pytest.fixture
def fake_cuda(monkeypatch) -> list[str]:
    """Stand-ins for torch.cuda.current_stream / torch.cuda.stream; returns the event list."""
    events: list[str] = []
    main = FakeStream(events, "main")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)

    @contextlib.contextmanager
    def on(stream):
        events.append(f"on {stream.name}")
        yield

    monkeypatch.setattr(torch.cuda, "stream", on)
    return events


class Lookahead(DevicePrefetcher):
    """The CUDA code path on the CPU: the side stream is a recording stand-in."""

    def __init__(self, source, transfer, device, events: list[str] | None = None) -> None:
        super().__init__(source, transfer, torch.device("cpu"))
        self.stream = FakeStream([] if events is None else events, "side")


def test_cpu_is_a_pass_through_that_fetches_nothing_ahead() -> None:
    source = Source(3)
    prefetcher = DevicePrefetcher(source, lambda x: 10 * x, torch.device("cpu"))
    assert prefetcher.stream is None
    assert next(prefetcher) == 0 and source.taken == 1
    assert next(prefetcher) == 10 and source.taken == 2
    assert list(prefetcher) == [20]


def test_cuda_path_fetches_one_ahead_and_waits_before_each_item(fake_cuda) -> None:
    events = fake_cuda
    source = Source(3)

    def transfer(x: int) -> int:
        events.append(f"transfer {x}")
        return 10 * x

    prefetcher = Lookahead(source, transfer, None, events)
    assert next(prefetcher) == 0
    # Item 0 is handed out only after the main stream waits for its transfer; item 1's
    # transfer is issued after that wait (it overlaps the step that uses item 0).
    assert events == ["on side", "transfer 0", "main waits for side", "on side", "transfer 1"]
    assert source.taken == 2
    events.clear()
    assert next(prefetcher) == 10
    assert events == ["main waits for side", "on side", "transfer 2"]
    assert next(prefetcher) == 20 and source.taken == 3
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_cuda_path_raises_an_error_at_its_own_item(fake_cuda) -> None:
    prefetcher = Lookahead(Source(4, fail=1), lambda x: x, None)
    assert next(prefetcher) == 0  # item 1's failure was met while fetching ahead: not raised yet
    with pytest.raises(OSError, match="item 1 is unreadable"):
        next(prefetcher)
    assert [next(prefetcher), next(prefetcher)] == [2, 3]


def _trainer(out: Path, demo: dict):
    from pixio.data.loader import build_data
    from pixio.runtime.config import to_container
    from pixio.runtime.distributed import DistInfo
    from pixio.runtime.trainer import Trainer
    from pretraining.task import MAETask
    from pretraining.train import build_model

    cfg = compose_pretrain([
        "data=demo", *CPU_OVERRIDES, f"data.root={demo['shards']}", "data.build_demo=false",
        f"data.json_root={demo['json_root']}", "data.shuffle_buffer=16", "data.num_workers=2",
        "train.save_every_iters=100", f"output_dir={out}",
    ])  # fmt: skip
    data = build_data(cfg.data, cfg.train, cfg.model.img_size, 0, 1)
    torch.manual_seed(cfg.train.seed)
    task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim)
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Trainer(cfg, task, data, cpu, to_container(cfg))


@pytest.mark.slow
def test_sigterm_with_the_lookahead_resumes_exactly(tmp_path, fake_cuda, monkeypatch) -> None:
    from pixio.data.demo import ensure_demo_data
    from pixio.runtime import trainer as trainer_module
    from pixio.runtime.preemption import PREEMPTED_EXIT_CODE

    demo = ensure_demo_data(tmp_path / "demo", samples=24, shard_size=4, workers=1)
    full = _trainer(tmp_path / "full", demo)
    full.fit()
    monkeypatch.setattr(trainer_module, "DevicePrefetcher", Lookahead)
    part = _trainer(tmp_path / "part", demo)
    original = part.train_iteration

    def train_iteration(it, batch):
        if it == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(it, batch)

    part.train_iteration = train_iteration
    with pytest.raises(SystemExit) as stopped:
        part.fit()
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    # Acted on after step 3 (log_every=1: each iteration waits for the device, so the ranks
    # agree at once); the loader had yielded batch 4 (the trainer's fetch ahead) and batch 5
    # (the prefetcher's): the state saved is two batches back.
    meta = trainer_module.checkpointing.read_meta(tmp_path / "part" / "checkpoint-last")
    assert meta["iteration"] == 4 and meta["data"][0]["iteration"] == 4
    resumed = _trainer(tmp_path / "part", demo)
    resumed.fit()
    assert resumed.progress.iteration == full.progress.iteration == 8
    for key, value in full.full_state().items():
        assert torch.equal(value, resumed.full_state()[key]), key
