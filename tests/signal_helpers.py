"""Helpers of the stop-signal tests: run a job's entry module in a subprocess that is its own
process group, and send SIGTERM to that whole group (the process and its data-loader workers,
as `timeout`, `kill -- -PGID` and SLURM do) at a chosen point of the run; tiny web shards."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pixio.runtime import checkpointing

REPO = Path(__file__).resolve().parents[1]

# Runs `module`'s CLI after arranging for SIGTERM to reach its whole process group, either at
# the start of training iteration k (`train:k`) or after the first batch of the first
# validation (`val:1`), when the validation loader's workers are running too.
_GROUP_SIGTERM = """
import os, runpy, subprocess, sys
from pixio.runtime.maploader import EvalLoader
from pixio.runtime.trainer import Trainer

where, at = sys.argv.pop(1).split(":")
module = sys.argv.pop(1)

def group_sigterm():
    # `kill -- -PGID` from outside the group, as a user, `timeout` or SLURM would send it (a
    # worker takes a SIGTERM from its own parent, this process, as PyTorch's terminate()).
    group = str(os.getpgid(0))
    subprocess.run(["kill", "-TERM", "--", "-" + group], check=True, start_new_session=True)

if where == "train":
    train_iteration = Trainer.train_iteration

    def patched(self, it, batch):
        if it == int(at):
            group_sigterm()
        return train_iteration(self, it, batch)

    Trainer.train_iteration = patched
else:
    val_iter = EvalLoader.__iter__

    def patched(self):
        for n, item in enumerate(val_iter(self)):
            yield item
            if n + 1 == int(at):
                group_sigterm()

    EvalLoader.__iter__ = patched
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def start_module(
    module: str, overrides: list[str], group_sigterm: str | None = None
) -> subprocess.Popen:
    """Start `python -m module overrides` in its own session (so a group signal reaches nothing
    of the test's); with `group_sigterm` ("train:k" or "val:n"), SIGTERM goes to its whole
    process group at that point."""
    args = (
        ["-m", module] if group_sigterm is None else ["-c", _GROUP_SIGTERM, group_sigterm, module]
    )
    return subprocess.Popen(
        [sys.executable, *args, *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def running(module: str, overrides: list[str]) -> Iterator[subprocess.Popen]:
    """`start_module` for a run beside the test's own work; killed if the test ends first."""
    proc = start_module(module, overrides)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    """Wait for `proc` (from `start_module`); on a time-out kill its group and fail with its output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args[1:3]} ran over {timeout} s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_module(
    module: str, overrides: list[str], group_sigterm: str | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`start_module` then `finish`."""
    return finish(start_module(module, overrides, group_sigterm), timeout)


def write_web_shard(path: Path, n: int, seed: int = 0) -> Path:
    """One web-format shard of `n` random JPEGs (72 x 80) at `path`."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(buf, "JPEG")
            tar.write({"__key__": f"{i:05d}", "jpg": buf.getvalue()})
    return path


def assert_same_mae(a: Path, b: Path, iteration: int) -> None:
    """Both pre-training runs' last checkpoints are at `iteration` with equal MAE weights."""
    first = checkpointing.load_checkpoint(a / "checkpoint-last")
    second = checkpointing.load_checkpoint(b / "checkpoint-last")
    assert first["iteration"] == second["iteration"] == iteration
    for key, value in first["model"]["mae"].items():
        assert torch.equal(value, second["model"]["mae"][key]), key
