"""An lr grid of heads on one frozen encoder: K heads, one per learning rate, trained in one run
on the same encoder features (DINOv2 trains its linear classifiers this way: the encoder's
forward, the whole cost, is paid once per batch instead of once per lr).

What any head task shares: the heads and their optimiser specs from a list of lrs (each head
`head_lr<value>`, built from the same seed, so a grid head starts, and on the CPU stays, exactly
where a single-lr run's head does; each optimiser its own lr and schedule), the per-head metric
names (`<head>/<metric>`), each head's best over epochs and final validation, and the rule that
picks the reported head. The linear probe and the depth and segmentation apps use it
(`evaluation.head_job.build_task`, `evaluation.task`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from evaluation.choices import head_name
from pixio.runtime.task import ModuleSpec, OptimizerSpec

RULE = "the head with the best {metric} over epochs; ties go to the first in the list of lrs"


def metric_key(head: str, metric: str) -> str:
    """A head's validation metric as the task reports it: `<head>/<metric>`."""
    return f"{head}/{metric}"


def with_lr(optim: Any, lr_key: str, value: float) -> Any:
    """A copy of an `optim` node (dataclass or DictConfig) with `lr_key` (`lr`, or `blr`:
    scaled by the global batch / 256, `lr` then cleared so the blr applies) set to `value`."""
    updates = {lr_key: value, **({"lr": None} if lr_key == "blr" else {})}
    if dataclasses.is_dataclass(optim):
        return dataclasses.replace(optim, **updates)
    return OmegaConf.merge(optim, updates)


@dataclass
class GridHead:
    """One head of the grid: its module name, its lr (as configured), the head, its `optim`."""

    name: str
    lr: float
    module: nn.Module
    optim: Any


def build_grid(
    lrs: Sequence[float],
    make_head: Callable[[], nn.Module],
    optim: Any,
    lr_key: str = "lr",
    seed: int = 0,
) -> list[GridHead]:
    """One head per lr, in the order given, each made by `make_head()` right after
    `torch.manual_seed(seed)` (the same initial weights as a single-lr run of that seed), each
    with its own `optim` copy (`with_lr`)."""
    grid = []
    for lr in lrs:
        torch.manual_seed(seed)
        grid.append(GridHead(head_name(lr), float(lr), make_head(), with_lr(optim, lr_key, lr)))
    return grid


def module_specs(grid: Sequence[GridHead]) -> dict[str, ModuleSpec]:
    """The heads as trainable modules of a task, by name."""
    return {h.name: ModuleSpec(h.module) for h in grid}


def optimizer_specs(grid: Sequence[GridHead]) -> dict[str, OptimizerSpec]:
    """One optimiser per head (same name), each with its own lr and schedule."""
    return {h.name: OptimizerSpec((h.name,), h.optim) for h in grid}


def _better(a: float, b: float, mode: str) -> bool:
    """a strictly better than b (a NaN never is; anything beats a NaN)."""
    if a != a:
        return False
    return b != b or (a > b if mode == "max" else a < b)


def head_results(
    epochs: Sequence[dict[str, Any]],
    heads: Sequence[str],
    metrics: Sequence[str],
    mode: str = "max",
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per head, its `best` (over epochs, by the first of `metrics`) and `final` validation:
    `epoch`, `iteration` and each metric under its plain name, from the validation rows
    `epochs` (which hold `<head>/<metric>`; `evaluation.common.validation_history`)."""
    out = {}
    for head in heads:
        rows = [{"epoch": e["epoch"], "iteration": e["iteration"],
                 **{m: e[metric_key(head, m)] for m in metrics}} for e in epochs]  # fmt: skip
        best = rows[0]
        for row in rows[1:]:
            if _better(row[metrics[0]], best[metrics[0]], mode):
                best = row
        out[head] = {"best": best, "final": rows[-1]}
    return out


def reported_head(results: dict[str, dict[str, dict[str, Any]]], metric: str, mode: str = "max") -> str:  # fmt: skip
    """The head a run reports (`RULE`): the best `best[metric]`, the first of equal ones."""
    heads = list(results)
    chosen = heads[0]
    for head in heads[1:]:
        if _better(results[head]["best"][metric], results[chosen]["best"][metric], mode):
            chosen = head
    return chosen
