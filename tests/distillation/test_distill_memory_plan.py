"""The distillation memory plan (scripts/memory_plan.py --distill) on a tiny teacher and two tiny
students over 8 fake ranks: the bytes it measures are the ones the placement must give."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import pixio
from distillation.model import build_student

pytestmark = pytest.mark.timeout(90)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "memory_plan.py"
TEACHER, STUDENTS = "pixio_vitt16", ("pixio_vitt16", "pixio_vits16")
OVERRIDES = {
    "teacher": dict(embed_dim=64, depth=2, num_heads=2),
    "pixio_vitt16": dict(embed_dim=32, depth=2, num_heads=2),
    "pixio_vits16": dict(embed_dim=48, depth=2, num_heads=2),
}
WORLD, BATCH = 8, 4


@pytest.fixture(scope="module")
def plan():
    spec = importlib.util.spec_from_file_location("memory_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(plan) -> dict:
    """(parallel, activation checkpointing) -> DistillMeasured."""
    kwargs = dict(teacher=TEACHER, students=STUDENTS, overrides=OVERRIDES)
    return {
        (par, ac): plan.measure_distill(WORLD, BATCH, ac, parallel=par, **kwargs)
        for par, ac in (("auto", False), ("auto", True), ("fsdp", False))
    }


def counts() -> tuple[int, list[int]]:
    """Parameters of the teacher and of each student (with last_proj)."""
    with torch.device("meta"):
        teacher = pixio.build_encoder(TEACHER, **OVERRIDES["teacher"])
        students = [build_student(n, 64, 4, **OVERRIDES[n]) for n in STUDENTS]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return n(teacher), [n(s) for s in students]


def test_small_modules_replicate_a_bf16_teacher_and_ddp_students(runs):
    m = runs[("auto", False)]
    teacher, students = counts()
    assert m.parallel == {"teacher": "none", **{n: "ddp" for n in STUDENTS}}
    assert m.teacher == 2 * teacher  # bf16 weights, no gradient, no optimiser state
    assert m.grads == 4 * sum(students)
    n_tensors = sum(
        len(list(build_student(n, 64, 4, **OVERRIDES[n]).parameters())) for n in STUDENTS
    )
    # fp32 params + DDP bucket + exp_avg + exp_avg_sq (+ one step counter per tensor)
    assert 16 * sum(students) <= m.states <= 16 * sum(students) + 4 * n_tensors
    assert m.peak > m.teacher + m.states + m.grads  # plus activations


def test_fsdp_shards_the_teacher_and_the_students(runs):
    full, sharded = runs[("auto", False)], runs[("fsdp", False)]
    assert set(sharded.parallel.values()) == {"fsdp"}
    assert sharded.teacher < full.teacher / 2 and sharded.states < full.states / 4


def test_activation_checkpointing_lowers_the_peak(runs):
    assert runs[("auto", True)].peak < runs[("auto", False)].peak
