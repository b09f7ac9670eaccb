"""Stop signals and data-loader workers, in-process on tiny tasks: workers leave SIGTERM / SIGINT /
SIGUSR2 to the main process, a worker that dies anyway is reported at the next batch (not in the
middle of a step or a save), the trainer still saves the last completed iteration when a worker
dies after the stop signal, two ranks stop together when one rank's data fails, and a fresh
start sets aside what a run that died before its first checkpoint left."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tests_helpers import free_port, start_ranks
from torch.utils.data import Dataset
from trainer_tasks import HeadTask, Regression, encoder_and_head, task_config

from pixio.runtime import checkpointing
from pixio.runtime.distributed import DistInfo
from pixio.runtime.logging import RUN_ID_NAME, read_or_create_run_id
from pixio.runtime.maploader import EvalLoader, MapLoader
from pixio.runtime.preemption import PREEMPTED_EXIT_CODE, SignalSafeLoader, wait_through_signals
from pixio.runtime.trainer import Trainer

pytestmark = pytest.mark.timeout(180)

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
N_TRAIN, N_VAL = 12, 5  # 6 iterations per epoch at batch 2, 3 epochs


class Pids(Dataset):
    """Item i is (i, pid of the process that read it)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, os.getpid()


def _exited(pid: int) -> bool:
    """True once process `pid` has ended (a zombie not yet reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def _wait_exited(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _exited(pid)


def test_workers_leave_stop_signals_to_the_main_process_but_obey_their_parent() -> None:
    loader = SignalSafeLoader(Pids(), batch_size=1, num_workers=1)
    batches = iter(loader)
    index, pid = (int(v) for v in next(batches))
    assert pid != os.getpid()
    for name in ("TERM", "INT", "USR2"):  # as `kill -- -PGID`, Ctrl-C or SLURM would send them
        subprocess.run(["kill", f"-{name}", str(pid)], check=True)
    assert not _wait_exited(pid, 1.0), "a worker died of a stop signal meant for the trainer"
    rest = [tuple(int(v) for v in batch) for batch in batches]
    assert [i for i, _ in rest] == list(range(index + 1, 40)) and {p for _, p in rest} == {pid}

    # PyTorch's last resort, terminate() from the parent, still ends a worker.
    batches = iter(loader)
    _, pid = (int(v) for v in next(batches))
    os.kill(pid, signal.SIGTERM)  # sent by this process: the worker's parent
    assert _wait_exited(pid), "the parent's SIGTERM did not end its worker"
    del batches


def test_a_dead_worker_is_reported_at_the_next_batch_not_wherever_the_trainer_is() -> None:
    batches = iter(SignalSafeLoader(Pids(), batch_size=1, num_workers=1))
    _, pid = (int(v) for v in next(batches))
    os.kill(pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
    assert _wait_exited(pid)
    for _ in range(20):  # "the trainer's step" (or its save): SIGCHLD must not raise in here
        time.sleep(0.02)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for _ in range(40):  # a prefetched batch or two may still come
            next(batches)


def _head_trainer(out: Path, workers: int, **train) -> Trainer:
    cfg = task_config(out, **train)
    encoder, head = encoder_and_head()
    task = HeadTask(encoder, head, cfg.optim)
    data = MapLoader(Regression(N_TRAIN), 2, num_workers=workers, seed=cfg.train.seed)
    val = EvalLoader(Regression(N_VAL, augment=False), 3, num_workers=workers)
    return Trainer(cfg, task, data, SINGLE, {"job": "head"}, val_data=val)


def _then_at(trainer: Trainer, k: int, action) -> None:
    """Run `action()` at the start of training iteration k."""
    original = trainer.train_iteration

    def train_iteration(it, batch):
        if it == k:
            action()
        return original(it, batch)

    trainer.train_iteration = train_iteration


def _sigterm_then_oom_kill_the_workers() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the stop flag
    for child in multiprocessing.active_children():  # the loader's worker(s)
        os.kill(child.pid, signal.SIGKILL)
        assert _wait_exited(child.pid)


def test_a_worker_killed_after_the_stop_signal_still_leaves_the_last_iteration_saved(tmp_path):
    full = _head_trainer(tmp_path / "full", 0)
    full.fit()
    part = _head_trainer(tmp_path / "part", 1)
    _then_at(part, 8, _sigterm_then_oom_kill_the_workers)
    with pytest.raises(SystemExit) as stopped:
        part.fit()
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert checkpointing.read_meta(tmp_path / "part" / "checkpoint-last")["iteration"] == 9
    resumed = _head_trainer(tmp_path / "part", 1)
    resumed.fit()
    assert resumed.progress.iteration == 18
    for key, value in full.full_state().items():
        assert torch.equal(value, resumed.full_state()[key]), key


def _loss_steps(path: Path) -> list[int]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_a_fresh_start_sets_aside_what_a_run_dead_before_its_first_checkpoint_left(
    tmp_path, caplog
):
    out = tmp_path / "run"
    out.mkdir()
    dead = _head_trainer(out, 0)
    (out / RUN_ID_NAME).write_text("deadrun1\n")  # what its wandb logger would have written

    def crash() -> None:
        raise MemoryError("killed")

    _then_at(dead, 5, crash)
    with pytest.raises(MemoryError):
        dead.fit()
    dead.close()
    assert not checkpointing.has_checkpoints(out)
    with caplog.at_level(logging.WARNING, logger="pixio.logging"):
        fresh = _head_trainer(out, 0)
    assert "kept as *.stale-1" in caplog.text
    fresh.fit()
    assert _loss_steps(out / "metrics.jsonl") == list(range(1, 19))  # each step once
    assert _loss_steps(out / "metrics.jsonl.stale-1") == [1, 2, 3, 4, 5]
    assert (out / f"{RUN_ID_NAME}.stale-1").read_text() == "deadrun1\n"
    assert (out / "config.yaml.stale-1").exists() and (out / "config.yaml").exists()
    assert read_or_create_run_id(out) != "deadrun1"  # a new wandb run, not the dead one's


class FailsOnRank1(Regression):
    """Rank 1's read number `fail_at` raises (a broken file, a dead worker)."""

    def __init__(self, n: int, rank: int, fail_at: int) -> None:
        super().__init__(n)
        self.rank, self.fail_at, self.reads = rank, fail_at, 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        if self.rank == 1 and self.reads == self.fail_at:
            raise OSError(f"cannot read sample {i}")
        return super().__getitem__(i)


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from pixio.runtime.distributed import cleanup, init_distributed

    info = init_distributed(device="cpu")
    cfg = task_config(Path(out), batch_size=2)
    encoder, head = encoder_and_head()
    data = MapLoader(FailsOnRank1(N_TRAIN, rank, fail_at=7), 2, rank, 2, seed=0)
    trainer = Trainer(cfg, HeadTask(encoder, head, cfg.optim), data, info, {"job": "head"})
    try:
        trainer.fit()
        outcome = "finished"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(out, f"rank{rank}.txt").write_text(outcome)
    cleanup()


def test_one_ranks_failed_fetch_stops_every_rank_with_the_last_iteration_saved(tmp_path):
    port = free_port()
    # a rank's error is raised here; hung ranks are killed after the timeout
    start_ranks(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, timeout=120)
    # Rank 1's 7th read is the first sample of iteration 3 (2 per batch): 3 iterations done.
    assert (tmp_path / "rank1.txt").read_text().startswith("OSError: cannot read sample ")
    assert (
        (tmp_path / "rank0.txt")
        .read_text()
        .startswith("RuntimeError: rank 1's data loader failed after iteration 3")
    )
    assert checkpointing.read_meta(tmp_path / "checkpoint-last")["iteration"] == 3


def test_waiting_for_torchrun_passes_a_signal_on_once_and_reports_the_stop(tmp_path) -> None:
    log = tmp_path / "signals.txt"
    child_code = (
        "import signal, sys, time\n"
        f"log = open({str(log)!r}, 'a', buffering=1)\n"
        "signal.signal(signal.SIGTERM, lambda s, f: log.write('TERM\\n'))\n"
        "log.write('ready\\n')\n"
        "time.sleep(1.5)\n"
        "sys.exit(1)  # what torchrun returns after a signal\n"
    )
    child = subprocess.Popen([sys.executable, "-c", child_code])

    def signal_me_twice() -> None:
        while not log.exists() or "ready" not in log.read_text():
            time.sleep(0.02)
        for _ in range(2):  # e.g. `kill <pid>` of the launcher alone, twice
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    threading.Thread(target=signal_me_twice, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    assert wait_through_signals(child) == PREEMPTED_EXIT_CODE
    assert log.read_text().split() == ["ready", "TERM"]  # passed on once
    assert signal.getsignal(signal.SIGTERM) is before  # restored
