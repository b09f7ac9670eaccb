"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

import contextlib
import io
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

TINY = dict(embed_dim=64, depth=3, num_heads=4)
TINY_DECODER = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A webdataset shard of `samples` in order; each sample is a dict of `__key__` and
    extension -> bytes. Creates the parent folder."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return path


# ---- Hydra configs ---------------------------------------------------------------------------
CONFIG_DIR = str((Path(__file__).parents[1] / "configs").resolve())

# What every CPU test run shrinks: a tiny model, a short schedule, no tracker, no workers.
CPU_OVERRIDES = [
    "model=vitt16",
    "model.img_size=64",
    "model.mask_grid=2",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.decoder_embed_dim=32",
    "model.decoder_depth=1",
    "model.decoder_num_heads=2",
    "train.batch_size=4",
    "train.epochs=2",
    "train.iters_per_epoch=4",
    "train.save_every_iters=4",
    "train.log_every=1",
    "train.vis_every=0",
    "train.precision=fp32",
    "train.device=cpu",
    "optim.lr=1e-3",
    "optim.warmup_epochs=1",
    "logger=none",
    "launcher=local",
    "data.num_workers=0",
]


def compose_pretrain(overrides: list[str]):
    """Compose the real pre-training config (configs/pretrain.yaml) with overrides."""
    from hydra import compose, initialize_config_dir

    from pretraining.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="pretrain", overrides=overrides)


# ---- Processes of the multi-rank tests ---------------------------------------------------------
# What the fork server imports once (pixio first: OpenMP's passive wait, as in the entry points).
RANK_PRELOAD = ["pixio", "torch", "torch.distributed", "pixio.runtime.trainer"]


def free_port() -> int:
    """A TCP port free on this host now (for a test's gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_in_env(rank: int, fn: Callable, env: dict[str, str], *args) -> None:
    """In a rank: the environment of the test that started it (the server holds its own)."""
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def start_ranks(fn: Callable, args: tuple = (), nprocs: int = 2, timeout: float = 300) -> None:
    """Run `fn(rank, *args)` in `nprocs` new processes, as `torch.multiprocessing.spawn` does,
    but forked from a server that imported torch once: a rank starts in a fraction of a second
    instead of ~4 CPU-seconds. A rank gets the caller's environment, working directory and
    sys.path; the rest (RNGs, threads) is the server's fresh state, the same in every rank.
    Waits for them, at most `timeout` seconds, then kills the ranks and fails the test; a rank's
    exception is raised here."""
    multiprocessing.set_forkserver_preload(RANK_PRELOAD)
    context = torch.multiprocessing.start_processes(
        _rank_in_env, args=(fn, dict(os.environ), *args), nprocs=nprocs, join=False,
        start_method="forkserver",
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):  # a rank's exception is raised here
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{getattr(fn, '__name__', fn)}: ranks still running after {timeout:.0f} s")


def run_main(main: Callable[[list[str]], object], argv: list[str]) -> subprocess.CompletedProcess:
    """A command line's `main(argv)` run in this process, reported as `subprocess.run` reports
    `python -m ...`: exit status (SystemExit's code; 0 when main returns) and what it printed.
    It saves the ~4 CPU-seconds of a new interpreter importing torch; one test per command line
    still runs it as a real process."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as stop:
            if isinstance(stop.code, str):  # as the interpreter does: printed, status 1
                print(stop.code, file=sys.stderr)
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
