"""The memory plan (scripts/memory_plan.py) on a tiny MAE over 8 fake ranks: what it measures
under FakeTensorMode matches the bytes the sharding must give and the analytic formula."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tests_helpers import TINY, TINY_DECODER

import pixio

pytestmark = pytest.mark.timeout(60)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "memory_plan.py"
NAME, OVERRIDES = "pixio_vitt16", {**TINY, **TINY_DECODER}
WORLD, BATCH = 8, 4
# The formula leaves out some per-op temporaries: measured and analytic peaks agree within 10%.
TOLERANCE = 0.10


def load_plan() -> ModuleType:
    spec = importlib.util.spec_from_file_location("memory_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plan() -> ModuleType:
    return load_plan()


@pytest.fixture(scope="module")
def meta_mae() -> pixio.PixioMAE:
    with torch.device("meta"):
        return pixio.build_mae(NAME, **OVERRIDES)


@pytest.fixture(scope="module")
def runs(plan) -> dict:
    """(parallel, activation checkpointing) -> Measured, one fake 8-rank step each."""
    return {
        (par, ac): plan.measure(NAME, par, WORLD, BATCH, ac, OVERRIDES)
        for par in ("fsdp", "ddp")
        for ac in (False, True)
    }


def n_params(mae: torch.nn.Module) -> int:
    return sum(p.numel() for p in mae.parameters())


def test_fsdp_shards_params_grads_and_adam_over_the_world(runs, meta_mae):
    m = runs[("fsdp", False)]
    params = list(meta_mae.parameters())
    lower = 16 * n_params(meta_mae) / WORLD  # fp32 param + grad + exp_avg + exp_avg_sq
    # FSDP2 pads dim 0 to a multiple of the world size: rank 0 holds ceil(rows / N) rows;
    # AdamW adds one fp32 step counter per parameter.
    upper = sum(16 * math.ceil(p.shape[0] / WORLD) * p[0].numel() + 4 for p in params)
    assert lower <= m.params + m.grads + m.optim <= upper
    assert m.params < 4 * n_params(meta_mae) / 2  # sharded, not replicated


def test_ddp_keeps_a_full_replica_and_a_bucket_copy_of_the_grads(runs, meta_mae):
    m = runs[("ddp", False)]
    n = n_params(meta_mae)
    assert m.params == 4 * n
    assert m.grads == 8 * n  # param.grad + DDP's fp32 buckets
    assert 8 * n <= m.optim <= 8 * n + 4 * len(list(meta_mae.parameters()))


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_activation_checkpointing_shrinks_activations(runs, parallel):
    off, on = runs[(parallel, False)], runs[(parallel, True)]
    assert on.activations > 0
    assert on.activations < off.activations
    assert on.peak < off.peak


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
@pytest.mark.parametrize("ac", [False, True])
def test_measured_peak_agrees_with_the_formula(plan, runs, meta_mae, parallel, ac):
    predicted = plan.analytic(plan.shape_of(meta_mae), parallel, WORLD, BATCH, ac).total
    measured = runs[(parallel, ac)].peak
    assert abs(measured - predicted) <= TOLERANCE * predicted, (measured, predicted)
