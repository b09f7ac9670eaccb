"""The results files of evaluation runs: read and checked (one line naming a bad file), what run
each belongs to, and whether a new run may write its results into a folder.

- `results.json`, one schema for every task: `task`, `dataset`, `demo` (demo data), `head`
  (k-NN: null; the linear probe: its feature), `metric`, `best` and `final` (labelled rows
  holding the metric), the `encoder` record {source, name, checkpoint, module, sha256,
  random_weights} (`encoder_record`), `protocol`, `architecture` and `config`. Head runs
  (depth, segmentation, the linear probe) add every epoch's validation (`epochs`) and, for an lr
  grid, each head's best and final (`grid`, checked like `best` and `final`);
  k-NN adds `by_k` and the `top1` / `top5` maps by k. k-NN files of earlier versions (`encoder`
  a name, `encoder_source`, `encoder_module`, `checkpoint_sha256`; the oldest without `task`,
  told apart by `top1`) still read (`encoder_of`).
- `val_results.json`: the trainer's best and last validation of a head run (`metric`, `best`,
  `last`), there while it runs and after.

Plain JSON reading only (no torch), so `python -m evaluation.report` starts at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PIXIO = "pixio"
RESULTS_FILE = "results.json"
VAL_RESULTS_FILE = "val_results.json"  # pixio.runtime.validation.RESULTS_NAME
HEAD_TASKS = ("depth", "semseg", "linear")  # runs that train heads: evaluation.head_job, linear_job
# What tells two runs' results apart: the task (a head run's dataset and head) and the encoder.
IDENTITY_KEYS = ("task", "dataset", "head", "source", "name", "module", "sha256")


class ResultsFileError(ValueError):
    """A results file that cannot be read, is cut short, or lacks what a finished run writes;
    the message starts with the file's path."""


def load_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`; ResultsFileError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsFileError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None  # fmt: skip
    if not text.strip():
        raise ResultsFileError(f"{path}: empty")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ResultsFileError(f"{path}: not valid JSON, cut short? ({err.msg}: line {err.lineno} column {err.colno})") from None  # fmt: skip
    if not isinstance(record, dict):
        raise ResultsFileError(f"{path}: holds a JSON {type(record).__name__}, not an object")
    return record


def is_knn(record: Mapping[str, Any]) -> bool:
    """A k-NN results.json (older ones have no `task`, but `top1`)."""
    return record.get("task") == "knn" or ("task" not in record and "top1" in record)


def _shown(value: Any) -> str:
    """A value as JSON, cut to fit in one error line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _need(ok: bool, path: Path, why: str) -> None:
    if not ok:
        raise ResultsFileError(f"{path}: {why}")


def _check_metric(entry: Any, metric: str, where: str, path: Path) -> None:
    _need(isinstance(entry, dict), path, f"`{where}` is {_shown(entry)}, not a validation record")  # fmt: skip
    _need(_is_number(entry.get(metric)), path, f"`{where}.{metric}` is {_shown(entry.get(metric))}, not a number")  # fmt: skip


def _check_head(record: Mapping[str, Any], path: Path) -> None:
    task = record.get("task")
    _need(task in HEAD_TASKS, path, f"`task` is {_shown(task)}, not one of {', '.join(HEAD_TASKS)} or knn")  # fmt: skip
    for key in ("dataset", "head", "metric"):
        _need(isinstance(record.get(key), str), path, f"`{key}` is {_shown(record.get(key))}, not a name")  # fmt: skip
    for key in ("best", "final"):
        _check_metric(record.get(key), record["metric"], key, path)
    encoder = record.get("encoder")
    _need(isinstance(encoder, dict) and isinstance(encoder.get("name"), str), path, "`encoder.name` is missing")  # fmt: skip
    if "grid" in record:
        _check_grid(record["grid"], record["metric"], path)


def _check_grid(grid: Any, metric: str, path: Path) -> None:
    """An lr grid's heads, each with a `best` and a `final` validation holding the metric."""
    _need(isinstance(grid, dict) and len(grid) > 0, path, f"`grid` is {_shown(grid)}, not the heads' results")  # fmt: skip
    for name, head in grid.items():
        for key in ("best", "final"):
            entry = head.get(key) if isinstance(head, dict) else None
            _check_metric(entry, metric, f"grid.{name}.{key}", path)


def _check_knn(record: Mapping[str, Any], path: Path) -> None:
    top1, top5 = record.get("top1"), record.get("top5", {})
    _need(isinstance(top1, dict) and len(top1) > 0, path, f"`top1` is {_shown(top1)}, not accuracies by k")  # fmt: skip
    _need(isinstance(top5, dict), path, f"`top5` is {_shown(top5)}, not accuracies by k")
    for key, table in (("top1", top1), ("top5", top5)):
        for k, value in table.items():
            _need(k.isdigit() and _is_number(value), path, f"`{key}.{k}` is {_shown(value)}, not an accuracy")  # fmt: skip
    encoder = record.get("encoder")
    named = isinstance(encoder, str) or (isinstance(encoder, dict) and isinstance(encoder.get("name"), str))  # fmt: skip
    _need(named, path, f"`encoder` is {_shown(encoder)}, not an encoder record")


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A finished run's results.json, checked: everything the report and the apps read is
    there with a value (a NaN metric of a diverged run is allowed; null is not)."""
    path = Path(path)
    record = load_json_object(path)
    (_check_knn if is_knn(record) else _check_head)(record, path)
    return record


def read_val_results(path: str | os.PathLike) -> dict[str, Any]:
    """A head run's val_results.json, checked: the metric, a best validation and, once there,
    the last one."""
    path = Path(path)
    record = load_json_object(path)
    metric = record.get("metric")
    _need(isinstance(metric, str), path, f"`metric` is {_shown(metric)}, not a name")
    _check_metric(record.get("best"), metric, "best", path)
    if record.get("last") is not None:
        _check_metric(record["last"], metric, "last", path)
    return record


def is_random(encoder_config: Mapping[str, Any]) -> bool:
    """Whether a run's recorded `encoder` config means random weights: the apps record the
    checkpoint's digest as `encoder.sha256`, null for a demo run without a checkpoint; configs
    saved before the digest was recorded lack the key and count as trained weights.
    (results.json says it as `random_weights`.)"""
    return "sha256" in encoder_config and encoder_config["sha256"] is None


def encoder_record(encoder: Mapping[str, Any], sha256: str | None) -> dict[str, Any]:
    """results.json's `encoder` for an `encoder` config and its checkpoint's digest (None:
    random weights, no checkpoint): source, name, checkpoint (resolved path), module, sha256,
    random_weights."""
    random = sha256 is None
    checkpoint = encoder.get("checkpoint")
    return {"source": encoder.get("source", PIXIO), "name": encoder["name"],
            "checkpoint": None if random or checkpoint is None else str(Path(checkpoint).resolve()),
            "module": encoder.get("module"), "sha256": sha256, "random_weights": random}  # fmt: skip


def encoder_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The `encoder` record of a checked results.json, also of a k-NN file of an earlier
    version (the encoder's name, with `encoder_source`, `encoder_checkpoint`, `encoder_module`,
    `checkpoint_sha256`, `random_weights` beside it)."""
    encoder = record["encoder"]
    if isinstance(encoder, Mapping):
        return {"source": PIXIO, "checkpoint": None, "module": None, **encoder}
    return {"source": record.get("encoder_source", PIXIO), "name": encoder,
            "checkpoint": record.get("encoder_checkpoint"), "module": record.get("encoder_module"),
            "sha256": record.get("checkpoint_sha256"),
            "random_weights": bool(record.get("random_weights"))}  # fmt: skip


def run_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a checked results.json was computed from (IDENTITY_KEYS): the task, a head run's
    dataset and head, and the encoder (source, name, module, checkpoint sha256; None: random)."""
    enc = encoder_of(record)
    knn = is_knn(record)
    return {"task": "knn" if knn else record["task"],
            "dataset": None if knn else record["dataset"], "head": None if knn else record["head"],
            "source": enc["source"], "name": enc["name"], "module": enc.get("module"),
            "sha256": enc.get("sha256")}  # fmt: skip


def app_identity(
    task: str,
    encoder: Mapping[str, Any],
    dataset: str | None = None,
    head: str | None = None,
    **digest: str | None,
) -> dict[str, Any]:
    """The identity (as `run_identity`) of a run about to write results, from its `encoder`
    config; pass `sha256=` once the checkpoint is hashed (left out, it is not compared)."""
    return {"task": task, "dataset": dataset, "head": head,
            "source": encoder.get("source", PIXIO), "name": encoder["name"],
            "module": encoder.get("module"), **digest}  # fmt: skip


def describe_run(identity: Mapping[str, Any]) -> str:
    """`depth nyuv2 dpt of pixio_vith16 (sha256 1a2b...)` / `k-NN of timm:vit_b (random weights)`."""
    what = "k-NN" if identity["task"] == "knn" else f"{identity['task']} {identity['dataset']} {identity['head']}"  # fmt: skip
    name = identity["name"] if identity["source"] == PIXIO else f"{identity['source']}:{identity['name']}"  # fmt: skip
    module = f" module {identity['module']}" if identity.get("module") else ""
    if "sha256" not in identity:
        return f"{what} of {name}{module}"
    weights = "random weights" if identity["sha256"] is None else f"sha256 {identity['sha256'][:16]}"  # fmt: skip
    return f"{what} of {name}{module} ({weights})"


def owner_problem(output_dir: str | os.PathLike, identity: Mapping[str, Any]) -> str | None:
    """Why a run of `identity` may not write its results into `output_dir` (None: it may).

    It may when the folder holds no results, or the results of the same task and encoder (a
    re-run replaces its own). It may not when the folder holds another task's or another
    encoder's results.json, a head run's val_results.json (unless this is that head run), or a
    results file that cannot be read. A key missing from `identity` is not compared (before the
    checkpoint is hashed: its sha256)."""
    folder = Path(output_dir)
    found = folder / RESULTS_FILE
    try:
        theirs = run_identity(read_results(found)) if found.exists() else None
    except ResultsFileError as err:
        return f"{err}; this run would replace it: move it away, or choose another output_dir"
    if theirs is None and identity["task"] == "knn" and (folder / VAL_RESULTS_FILE).exists():
        return (f"{folder} holds the validation results of a depth / segmentation run "
                f"({VAL_RESULTS_FILE}); a k-NN's results.json beside them would be taken for "
                f"that run's: choose another output_dir")  # fmt: skip
    differs = theirs is not None and any(theirs[k] != identity[k] for k in IDENTITY_KEYS if k in identity)  # fmt: skip
    if differs:
        return (f"{folder} holds the results of another run ({RESULTS_FILE}: "
                f"{describe_run(theirs)}); this run ({describe_run(identity)}) would replace "
                f"them: choose another output_dir, or move that file away")  # fmt: skip
    return None
