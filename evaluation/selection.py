"""Which head and epoch a depth / segmentation run reports, and measured on which split
(`eval.select`; docs/evaluation.md, "Choosing what is reported").

- `reference` (default): the epoch with the best ranking metric (d1, mIoU) on the validation
  split, as the reference does; the whole row of that epoch. The epoch is chosen on the split
  that is reported.
- `last`: the last epoch.
- `holdout`: a seeded `eval.holdout_fraction` of the training split is kept out of training and
  validated after every epoch instead of the validation split; the head and epoch with the
  best metric there are chosen, and the validation split is measured once, at the end, with
  that head's weights of that epoch. Those weights are kept (`selection/<head>_it<N>.pt`) at
  each validation where a head beats its own best so far, so a resumed run still has them.

With a grid of heads (`head.lrs`) the reported head is `evaluation.grid`'s (`RULE`: the best
over epochs, ties to the first lr; `last`: the best last epoch). Every end-of-epoch validation
also leaves its heads' tables (per class, per depth bin) in `tables/val_it<N>.json`, from which
`results.json` takes the reported one's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.choices import head_name
from evaluation.grid import RULE, head_results, metric_key, reported_head
from pixio.runtime.atomic import atomic_path, write_text_atomic
from pixio.runtime.distributed import is_main
from pixio.runtime.step import autocast, autocast_dtype
from pixio.runtime.validation import RESULTS_NAME, run_validation

log = logging.getLogger("pixio.eval")

RULES = {
    "reference": "epoch with the best {metric} on the validation split (the reference's rule: "
    "chosen on the split it reports)",
    "last": "last epoch",
    "holdout": "head and epoch with the best {metric} on a held-out {percent:g} % of the "
    "training split; the validation split measured once, with that choice",
}
LAST_HEAD_RULE = "the head with the best last-epoch {metric}; ties go to the first in the list of lrs"  # fmt: skip
TABLES_DIR, SELECTION_DIR = "tables", "selection"


# ---- the heads of a run -------------------------------------------------------------------
@dataclass
class RunHead:
    """One head of a run: its module (and checkpoint) name, its label in results, its lr."""

    module: str  # `head` for one lr (as before grids), else `head_lr<value>`
    label: str  # `head_lr<value>`
    lr: float | None


def run_heads(config: dict[str, Any]) -> list[RunHead]:
    """The heads of a run from its config: one per `head.lrs`, or the one of `optim.lr`."""
    lrs = (config.get("head") or {}).get("lrs") or [(config.get("optim") or {}).get("lr")]
    if len(lrs) == 1:
        lr = lrs[0]
        return [RunHead("head", head_name(lr) if lr is not None else "head", lr)]
    return [RunHead(head_name(lr), head_name(lr), float(lr)) for lr in lrs]


def select_rule(config: dict[str, Any]) -> str:
    """`eval.select` of a run's config (`reference` for runs from before the key)."""
    return (config.get("eval") or {}).get("select") or "reference"


# ---- the validations of a run -----------------------------------------------------------
def validation_history(output_dir: str | os.PathLike, iters_per_epoch: int) -> list[dict[str, Any]]:  # fmt: skip
    """The end-of-epoch validations of the run (metrics.jsonl): epoch, iteration, metrics. A
    validation at a `train.max_iters` stop in mid-epoch is left out, so a run stopped and resumed
    reports what an uninterrupted one does."""
    path = Path(output_dir) / "metrics.jsonl"
    by_iteration = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line) if line.strip() else {}
        metrics = {k[4:]: v for k, v in record.items() if k.startswith("val/")}
        if metrics and record["step"] % iters_per_epoch == 0:
            by_iteration[record["step"]] = {"epoch": record["epoch"], "iteration": record["step"], **metrics}  # fmt: skip
    return [by_iteration[i] for i in sorted(by_iteration)]


def head_metric_names(epochs: Sequence[dict[str, Any]], heads: Sequence[RunHead], metric: str) -> list[str]:  # fmt: skip
    """A head's metric names in the validation rows, the ranking metric first."""
    row = epochs[0]
    if len(heads) == 1:
        names = [k for k in row if k not in ("epoch", "iteration", "samples")]
    else:
        prefix = metric_key(heads[0].module, "")
        names = [k[len(prefix) :] for k in row if k.startswith(prefix)]
    return [metric, *(n for n in names if n != metric)]


def grid_rows(epochs: Sequence[dict[str, Any]], heads: Sequence[RunHead], names: Sequence[str]) -> list[dict[str, Any]]:  # fmt: skip
    """The rows in `evaluation.grid`'s form (`<module>/<metric>` for every head), also for one
    head, whose validations log plain names."""
    if len(heads) > 1:
        return list(epochs)
    (head,) = heads
    return [{**e, **{metric_key(head.module, n): e[n] for n in names}} for e in epochs]


def per_head_results(epochs: Sequence[dict[str, Any]], heads: Sequence[RunHead], metric: str) -> dict[str, dict[str, Any]]:  # fmt: skip
    """By module: `best` (over epochs, by `metric`) and `final`, each a whole row of that head
    (epoch, iteration, every metric of the head, samples), and its `epochs`."""
    names = head_metric_names(epochs, heads, metric)
    out = head_results(grid_rows(epochs, heads, names), [h.module for h in heads], names)
    samples = {e["iteration"]: e.get("samples") for e in epochs}
    for head in heads:
        rows = [{"epoch": e["epoch"], "iteration": e["iteration"], **{n: e[metric_key(head.module, n)] for n in names}} for e in grid_rows(epochs, heads, names)]  # fmt: skip
        for row in [*rows, out[head.module]["best"], out[head.module]["final"]]:
            row["samples"] = samples[row["iteration"]]
        out[head.module]["epochs"] = rows
    return out


def chosen_head(per_head: dict[str, dict[str, Any]], metric: str, rule: str) -> str:
    """The module reported: the best over epochs (`reference`, `holdout`) or the best last
    epoch (`last`); ties go to the first lr (`evaluation.grid.reported_head`)."""
    if rule == "last":
        return reported_head({h: {"best": r["final"]} for h, r in per_head.items()}, metric)
    return reported_head(per_head, metric)


def head_rule(rule: str, metric: str) -> str:
    """How the reported head of a grid is chosen, in words."""
    return (LAST_HEAD_RULE if rule == "last" else RULE).format(metric=metric)


# ---- what each validation leaves ----------------------------------------------------------
def tables_path(output_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(output_dir) / TABLES_DIR / f"val_it{iteration:08d}.json"


def selection_path(output_dir: str | os.PathLike, module: str, iteration: int) -> Path:
    return Path(output_dir) / SELECTION_DIR / f"{module}_it{iteration:08d}.pt"


class ValidationRecords:
    """Called by the task after each summary (`HeadTask.after_summary`), on every rank; rank 0
    writes, for an end-of-epoch validation, its heads' tables and (`keep_heads`: eval.select=
    holdout) the state of each head that beat its own best (`per_head_results`' rule) so far,
    the history read from metrics.jsonl at the first call (after a resume: its rewound rows)."""

    def __init__(self, task: Any, output_dir: str | os.PathLike, iters_per_epoch: int,
                 iteration: Callable[[], int], keep_heads: bool, split: str) -> None:  # fmt: skip
        self.task, self.output_dir, self.iters_per_epoch = task, Path(output_dir), iters_per_epoch
        self.iteration, self.keep_heads, self.split = iteration, keep_heads, split
        self.heads = [RunHead(h.name, h.name, h.lr) for h in task.grid]  # by module name
        self.rows: list[dict[str, Any]] | None = None  # the end-of-epoch validations so far

    def __call__(self, metrics: dict[str, float]) -> None:
        done = self.iteration()
        if done % self.iters_per_epoch or not is_main():
            return  # a mid-epoch stop's validation is never reported
        epoch = done / self.iters_per_epoch
        record = {"iteration": done, "epoch": epoch, "split": self.split,
                  "tables": {h.module: self.task.tables.get(h.module) for h in self.heads}}  # fmt: skip
        write_text_atomic(_made(tables_path(self.output_dir, done)), json.dumps(record) + "\n")
        if self.keep_heads:
            self._keep_improved(done, epoch, metrics)

    def _keep_improved(self, done: int, epoch: float, metrics: dict[str, float]) -> None:
        if self.rows is None:
            self.rows = [e for e in validation_history(self.output_dir, self.iters_per_epoch) if e["iteration"] < done]  # fmt: skip
        self.rows.append({"epoch": epoch, "iteration": done, **metrics})
        metric = self.task.validation.metric
        for module, result in per_head_results(self.rows, self.heads, metric).items():
            if result["best"]["iteration"] == done:
                save_head(self.output_dir, module, done, self.task.grid_module(module))


def save_head(output_dir: str | os.PathLike, module: str, iteration: int, head: nn.Module) -> Path:
    """A head's weights and buffers at `iteration` (CPU tensors, weights_only-loadable),
    written atomically."""
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    path = _made(selection_path(output_dir, module, iteration))
    with atomic_path(path) as tmp:
        torch.save({"module": module, "iteration": iteration, "state": state}, tmp)
    return path


def _made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def reported_table(output_dir: str | os.PathLike, iteration: int, module: str) -> Any:
    """The table of head `module` at `iteration` (None when that validation left none)."""
    path = tables_path(output_dir, iteration)
    if not path.exists():
        return None
    return (json.loads(path.read_text())["tables"] or {}).get(module)


# ---- holdout: the choice, then one measurement on the validation split ----------------------
def holdout_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, holdout) indices of a split of `n` pairs: round(n * fraction) of them, at
    least one, drawn by a generator seeded with `seed`; both sorted. ValueError when either part
    would be empty."""
    keep = max(1, round(n * fraction))
    if keep >= n:
        raise ValueError(f"a holdout of {fraction:g} of {n} training pairs leaves none to train on")  # fmt: skip
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[keep:]), sorted(order[:keep])


def holdout_choice(output_dir: str | os.PathLike, iters_per_epoch: int, heads: Sequence[RunHead], metric: str) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """(module, its holdout row) of the reported head and epoch, from the run's history."""
    per_head = per_head_results(validation_history(output_dir, iters_per_epoch), heads, metric)
    module = chosen_head(per_head, metric, "holdout")
    return module, per_head[module]["best"]


@contextlib.contextmanager
def evaluating(modules: dict[str, nn.Module], device: torch.device, precision: str) -> Iterator[None]:  # fmt: skip
    """Every module in eval mode, no gradients, the run's autocast (the trainer's validation)."""
    for module in modules.values():
        module.eval()
    with torch.no_grad(), autocast(device, autocast_dtype(precision)):
        yield


def measure_once(task: Any, modules: dict[str, nn.Module], val_data: Any, device: torch.device,
                 precision: str, output_dir: str | os.PathLike, choice: tuple[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The validation split measured once (collective), with the chosen head's weights of the
    chosen epoch: the metrics row (epoch and iteration of the choice) and the head's table."""
    module, row = choice
    saved = torch.load(selection_path(output_dir, module, row["iteration"]), map_location="cpu", weights_only=True)  # fmt: skip
    task.grid_module(module).load_state_dict(saved["state"])
    task.active, task.steps_done = [module], row["iteration"]  # pictures: the chosen weights' step
    with evaluating(modules, device, precision):
        metrics = run_validation(task, modules, val_data, device)
    return {"module": module, "row": {"epoch": row["epoch"], "iteration": row["iteration"], **metrics},
            "table": task.tables.get(module)}  # fmt: skip


def drop_unchosen(output_dir: str | os.PathLike, keep: Path) -> int:
    """Remove the kept head weights other than `keep` (the run is complete); returns how many."""
    removed = 0
    for path in sorted((Path(output_dir) / SELECTION_DIR).glob("*.pt")):
        if path != keep:
            path.unlink()
            removed += 1
    return removed


# ---- results.json's account of the choice -----------------------------------------------------
def selection_results(output_dir: str | os.PathLike, config: dict[str, Any], iters_per_epoch: int,
                      measured: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The part of results.json that says what is reported: `best` and `final` (labelled),
    `epochs`, `reported_head`, the `select` record (rule, its words, the split the epochs were
    measured on), the `grid` of heads (each: module, lr, best, final, epochs) and the reported
    table (`table`: head, epoch, split, rows). `measured`: holdout's one measurement."""
    metric = json.loads((Path(output_dir) / RESULTS_NAME).read_text())["metric"]
    epochs = validation_history(output_dir, iters_per_epoch)
    heads, rule = run_heads(config), select_rule(config)
    per_head = per_head_results(epochs, heads, metric)
    module = chosen_head(per_head, metric, rule)
    label = next(h.label for h in heads if h.module == module)
    mark = {} if len(heads) == 1 else {"head": label}
    best, final = per_head[module]["best"], per_head[module]["final"]
    if len(heads) == 1:  # one head: the whole validation rows, as before grids
        best, final = (next(e for e in epochs if e["iteration"] == r["iteration"]) for r in (best, final))  # fmt: skip
    fraction = (config.get("eval") or {}).get("holdout_fraction")
    select = {"rule": rule, "text": RULES[rule].format(metric=metric, percent=100 * (fraction or 0)),
              "epochs_split": "holdout" if rule == "holdout" else "val"}  # fmt: skip
    if len(heads) > 1:
        select["head_rule"] = head_rule(rule, metric)
    if rule == "holdout":
        select["holdout_fraction"] = fraction
        reported = {"label": "validation split, measured once with the head and epoch chosen on the holdout", "split": "val", **mark, **measured["row"]}  # fmt: skip
        table = {"split": "val", "epoch": measured["row"]["epoch"], "rows": measured["table"]}
        final_label = {"label": "final epoch, on the holdout (training images)", "split": "holdout"}  # fmt: skip
    else:
        label_of = {"reference": "best over epochs", "last": "last epoch"}
        row = final if rule == "last" else best
        reported = {"label": label_of[rule], **mark, **row}
        table = {"split": "val", "epoch": row["epoch"], "rows": reported_table(output_dir, row["iteration"], module)}  # fmt: skip
        final_label = {"label": "final epoch"}
    grid = {h.label: {"module": h.module, "lr": h.lr, **{k: per_head[h.module][k] for k in ("best", "final", "epochs")}} for h in heads}  # fmt: skip
    return {"metric": metric, "best": reported, "final": {**final_label, **mark, **final},
            "epochs": epochs, "reported_head": label, "select": select, "grid": grid,
            "table": {"head": label, **table}}  # fmt: skip
