"""Shared fixtures: tiny models and Hydra configs shrunk for CPU."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tests_helpers import CPU_OVERRIDES, TINY, TINY_DECODER, compose_pretrain

import pixio


@pytest.fixture
def tiny_encoder() -> pixio.PixioEncoder:
    torch.manual_seed(0)
    return pixio.build_encoder("pixio_vitt16", **TINY).eval()


@pytest.fixture
def tiny_mae() -> pixio.PixioMAE:
    torch.manual_seed(0)
    return pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER)


@pytest.fixture
def cpu_config(tmp_path):
    """A composed pre-training config shrunk for CPU, writing under tmp_path."""

    def make(*extra: str):
        return compose_pretrain(
            [*CPU_OVERRIDES, f"output_dir={tmp_path / 'run'}", "data.root=unused", *extra]
        )

    return make


@pytest.fixture
def dynamo_counters():
    """torch._dynamo's counters (graphs, graph breaks, frames) of this test alone: dynamo's
    caches and counters reset before and after it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


# The tests that submit jobs to the one-node cluster (all marked `slurm`).
SLURM_FILES = "tests/slurm/test_slurm_"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make test` the `slurm` tests come first (about 6 minutes, mostly waiting on SLURM,
    on one worker beside the rest of the suite), then the files with `slow` tests, so that no
    long file starts last and trails the others."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    for item in items:
        if item.get_closest_marker("slurm") and not item.nodeid.startswith(SLURM_FILES):
            raise pytest.UsageError(f"{item.nodeid}: a `slurm` test belongs in {SLURM_FILES}*.py")
    items.sort(key=lambda item: (not item.get_closest_marker("slurm"), item.path not in slow_files))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs pytest-xdist workers (`-n 3 --dist loadgroup`; any `load*` mode here)
    that each take whole files: a file's module fixtures (a compiled model, a two-rank run) are
    built once, not once per worker, and the SLURM files form one group, so their jobs reach the
    one-node cluster one at a time as in a serial run (two jobs at once would queue behind each
    other into their time-outs). xdist's own `xdist_group` mark cannot do this under pytest 9.2,
    which no longer reads the node-id suffix the mark relies on."""
    if config.getvalue("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None  # each / worksteal: the user's choice, as xdist does it
    from xdist.scheduler import LoadGroupScheduling

    if not callable(getattr(LoadGroupScheduling, "_split_scope", None)):
        raise pytest.UsageError("pytest-xdist's LoadGroupScheduling has no _split_scope: update tests/conftest.py's scheduler")  # fmt: skip

    class FileScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if nodeid.startswith(SLURM_FILES) else nodeid.split("::")[0]

    config.option.loadscopereorder = False  # keep the order above
    return FileScheduling(config, log)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG states, whatever ran before it in its process
    (pytest-xdist hands each worker a different sequence of tests)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count leaves it as it found it: an in-process run
    (`train.cpu_threads=auto`) and a by-hand reference after it then use one count, as bit-equal
    float results on the CPU need."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
