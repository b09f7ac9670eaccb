"""Validation bookkeeping shared by every job: summing per-sample statistics over real samples
and ranks (each validation sample counted exactly once), and tracking the best and the last
results (kept in checkpoints and in `val_results.json`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pixio.runtime.distributed import is_dist, reduce_device
from pixio.runtime.task import Task, Validation

RESULTS_NAME = "val_results.json"


def add_real(
    totals: dict[str, torch.Tensor], stats: Mapping[str, torch.Tensor], real: torch.Tensor
) -> None:
    """Add the per-sample `stats` (leading dimension B) of the samples where `real` is True to
    `totals`, in float64 (exact counts up to 2**53). Padded samples are zeroed, not multiplied,
    so a NaN in a padded sample never leaks in."""
    for key, value in stats.items():
        value = value.detach().to(torch.float64)
        if value.shape[:1] != real.shape:
            raise ValueError(
                f"validation statistic {key!r} has shape {tuple(value.shape)}: its first "
                f"dimension must be the batch size {real.numel()}"
            )
        keep = real.to(value.device).view(-1, *([1] * (value.ndim - 1)))
        summed = torch.where(
            keep, value, torch.zeros((), dtype=value.dtype, device=value.device)
        ).sum(0)
        totals[key] = totals[key] + summed if key in totals else summed


def sum_over_ranks(totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's totals summed, in one collective (every rank must hold the same keys and
    shapes: all ranks run the same number of validation batches)."""
    keys = sorted(totals)
    if not is_dist() or not keys:
        return {k: totals[k].cpu() for k in keys}
    flat = torch.cat([totals[k].reshape(-1).to(reduce_device()) for k in keys])
    dist.all_reduce(flat)
    out, offset = {}, 0
    for key in keys:
        n = totals[key].numel()
        out[key] = flat[offset : offset + n].reshape(totals[key].shape).cpu()
        offset += n
    return out


def run_validation(
    task: Task, modules: dict[str, Any], val_data: Iterable, device: torch.device
) -> dict[str, float]:
    """The task's metrics over `val_data` ((batch, real) pairs, an `EvalLoader`): per-sample
    statistics summed over the real samples of every rank (collective; the caller sets eval
    mode, no grad and autocast)."""
    totals: dict[str, torch.Tensor] = {}
    samples = torch.zeros((), dtype=torch.float64)
    for batch, real in val_data:
        add_real(totals, task.validate(modules, task.to_device(batch, device)), real)
        samples += real.sum()
    totals["samples"] = samples
    return task.summarize(sum_over_ranks(totals))


class ValidationRecord:
    """Best and last validation results of a run; restored from a checkpoint on resume."""

    def __init__(self, spec: Validation) -> None:
        self.spec = spec
        self.best: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None

    def update(self, metrics: Mapping[str, float], epoch: float, iteration: int) -> bool:
        """Record one validation; returns True when it is the new best."""
        if self.spec.metric not in metrics:
            raise KeyError(
                f"validation metric {self.spec.metric!r} is not among the task's results "
                f"({', '.join(sorted(metrics))})"
            )
        entry = {
            **{k: float(v) for k, v in metrics.items()},
            "epoch": epoch,
            "iteration": iteration,
        }
        self.last = entry
        best = None if self.best is None else self.best[self.spec.metric]
        improved = self.spec.better(entry[self.spec.metric], best)
        if improved:
            self.best = entry
        return improved

    def row(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """What one validation logs: `val/<metric>` and the best so far (`best/<metric>`,
        `best/epoch`)."""
        best = self.best or {}
        key = self.spec.metric
        row = {f"val/{k}": v for k, v in metrics.items()}
        return row | {f"best/{key}": best.get(key), "best/epoch": best.get("epoch")}

    def summary(self, metrics: Mapping[str, float], epoch: float, improved: bool) -> str:
        """The log line of one validation."""
        best, key = self.best or {}, self.spec.metric
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return (
            f"validation at epoch {epoch:.4g}: {shown}{' [new best]' if improved else ''} "
            f"(best {key} {best.get(key, float('nan')):.4g} at epoch "
            f"{best.get('epoch', float('nan')):.4g})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.spec.metric,
            "mode": self.spec.mode,
            "best": self.best,
            "last": self.last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.last = state.get("best"), state.get("last")

    def write(self, output_dir: str | os.PathLike) -> Path:
        """`val_results.json`: the best (by `metric`) and the last (final, at the end) results."""
        path = Path(output_dir) / RESULTS_NAME
        tmp = path.with_name(f".{RESULTS_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.state_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path
