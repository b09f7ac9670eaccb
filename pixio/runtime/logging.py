"""Run logging: python logging set-up, `metrics.jsonl`, the console progress line, throughput,
and wandb.

`MetricsWriter` and `WandbLogger` do nothing unless `enabled` (pass `rank == 0`), so callers
need no rank checks.

wandb mode: `logger.mode` goes to `wandb.init` as is; None lets wandb decide (WANDB_MODE, its
settings files such as `wandb offline`, its login state). What None does without credentials
(measured with wandb 0.31): `wandb.init` raises "No API key configured" in 0.1 s when stdin or
stderr is not a terminal (sbatch), but shows its login menu and waits for an answer for ever
when both are (`srun --pty`, torchrun from a shell); `wandb.init(settings=...)` has no field
that stops this (its `login_timeout` / `silent` do not reach the login). So with mode None, when
wandb's own mode is online, the logger first asks `wandb.login(prompt=False, verify=False)`
(wandb's own credential lookup: never prompts, does not check the key with the server). Without
credentials, or when `wandb.init` fails anyway (a key but no network: wandb retries for its
`init_timeout`, about 100 s, then raises), it logs one warning and starts the same run id in
`offline` mode, so the metrics stay under `<dir>/wandb` for `wandb sync`. Any other failure
logs a warning and turns wandb off: logging never stops training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("pixio.logging")

METRICS_NAME = "metrics.jsonl"
RUN_ID_NAME = "wandb_run_id.txt"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


# ---- python logging ---------------------------------------------------------------------------
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_NAME = "train.log"


def _is_ours(handler: logging.Handler) -> bool:
    return getattr(handler, "_pixio", False)


def setup_logging(output_dir: str | os.PathLike, rank: int = 0) -> None:
    """Route the `pixio.*` loggers: INFO on rank 0, WARNING on other ranks (tagged with the
    rank); rank 0 also appends to `output_dir/train.log`.

    Handlers go on the root logger so Hydra's and pytest's handlers keep working; a console
    handler is added only where nobody configured one (torchrun / submitit children), no file
    handler is added when one already writes train.log (Hydra's job log), and calling this
    again replaces what the previous call installed.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _is_ours(h)]:
        root.removeHandler(handler)
        handler.close()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    if not root.handlers:
        _add_handler(root, logging.StreamHandler(), prefix)
        root.setLevel(logging.INFO)
    log_file = (Path(output_dir) / LOG_FILE_NAME).resolve()
    taken = {getattr(h, "baseFilename", None) for h in root.handlers}
    if rank == 0 and str(log_file) not in taken:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        _add_handler(root, logging.FileHandler(log_file), prefix)
    logging.getLogger("pixio").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _add_handler(root: logging.Logger, handler: logging.Handler, prefix: str) -> None:
    handler.setFormatter(logging.Formatter(prefix + LOG_FORMAT))
    handler._pixio = True  # type: ignore[attr-defined]
    root.addHandler(handler)


# ---- metrics.jsonl ----------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Plain JSON value: tensors/numpy scalars become numbers; NaN/inf become null (strict JSON
    readers such as jq reject NaN)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Complete, parseable lines of a metrics file (a torn last line from a kill is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """Appends one JSON object per `write` to `output_dir/metrics.jsonl`, flushed per line.

    A restarted run keeps appending to the same file. After resuming from a checkpoint at
    step S, call `rewind(S)`: it drops the lines a killed run wrote after S, which the resumed
    run is about to write again, so every step appears once. A fresh start (no checkpoint)
    first sets aside the file of a run that died before its first checkpoint
    (`set_aside_stale`), so its steps are not followed by the same steps again.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(output_dir) / METRICS_NAME
        self.enabled = enabled
        self._file = None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` as one line (opened lazily, so `rewind` can run first)."""
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_torn_tail()
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(_jsonable(dict(record))) + "\n")
        self._file.flush()

    def _drop_torn_tail(self) -> None:
        """A kill mid-write can leave a last line without newline; cut it so the next record
        starts on its own line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def rewind(self, step: int) -> int:
        """Rewrite the file without records whose `step` > `step`; returns how many were
        dropped. The rewrite is atomic (temp file + os.replace)."""
        if not self.enabled or not self.path.exists():
            return 0
        self.close()
        records = _read_records(self.path)
        kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
        tmp = self.path.with_name(f".{METRICS_NAME}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return len(records) - len(kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def set_aside_stale(output_dir: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Rename each of `names` found in `output_dir` to `<name>.stale-<n>`, with one n for all
    (the first that none of them has taken): the records of a run that died before its first
    checkpoint, which a fresh start would otherwise append to (metrics.jsonl) or take over
    (the wandb run id). Logged; returns the new paths."""
    out = Path(output_dir)
    found = [out / name for name in names if (out / name).exists()]
    if not found:
        return []
    n = 1
    while any((out / f"{name}.stale-{n}").exists() for name in names):
        n += 1
    moved = [path.with_name(f"{path.name}.stale-{n}") for path in found]
    for old, new in zip(found, moved, strict=True):
        os.replace(old, new)
    log.warning(
        "fresh start: no checkpoint in %s, so %s are a dead run's; kept as *.stale-%d",
        out, ", ".join(p.name for p in found), n,
    )  # fmt: skip
    return moved


# ---- console ----------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """`H:MM:SS` (hours unbounded); `?` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


# Known metrics, in display order: key -> (label, format). Other numeric keys follow as `key v`.
_DISPLAY: dict[str, tuple[str, str]] = {
    "loss": ("loss", "{:.4f}"),
    "lr": ("lr", "{:.1e}"),
    "grad_norm": ("gnorm", "{:.3g}"),
    "images_per_s": ("img/s", "{:.1f}"),
    "tflops": ("TFLOP/s", "{:.3g}"),
    "mfu": ("mfu", "{:.1%}"),
    "data_wait": ("data", "{:.0%}"),
    "max_mem_gb": ("mem", "{:.1f}G"),
}
_HIDDEN = {"step", "epoch"}


def _fmt(fmt: str, value: Any) -> str:
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return str(value)


def format_progress(step: int, total: int, eta_s: float, metrics: Mapping[str, Any]) -> str:
    """One console line, e.g. `[  120/1000] eta 0:03:12 loss 0.8123 lr 1.2e-04 img/s 350.1
    TFLOP/s 157 mfu 15.9% data 12% mem 1.2G`."""
    parts = [f"[{step:>{len(str(total))}d}/{total}]", f"eta {format_duration(eta_s)}"]
    for key, (label, fmt) in _DISPLAY.items():
        if metrics.get(key) is not None:
            parts.append(f"{label} {_fmt(fmt, metrics[key])}")
    for key, value in metrics.items():
        if key not in _DISPLAY and key not in _HIDDEN and isinstance(value, (int, float)):
            parts.append(f"{key} {_fmt('{:.4g}', value)}")
    return " ".join(parts)


class Throughput:
    """Images/s and data-wait share, smoothed over the last `window` iterations.

    Feed it once per iteration with `update(images, step_time, data_time)`, where step_time is
    the whole iteration (waiting for the loader included) and data_time the wait alone; or use
    `data_ready()` / `step_done(images)` to let it time the iteration itself.
    """

    def __init__(self, window: int = 20) -> None:
        self.samples: deque[tuple[int, float, float]] = deque(maxlen=window)
        self._start = time.perf_counter()
        self._data_done = self._start

    def update(self, images: int, step_time: float, data_time: float) -> None:
        self.samples.append((images, step_time, data_time))

    def data_ready(self) -> None:
        """The batch arrived: the time since the previous `step_done` was data wait."""
        self._data_done = time.perf_counter()

    def step_done(self, images: int) -> None:
        """The iteration finished: record it and start timing the next one."""
        now = time.perf_counter()
        self.update(images, now - self._start, self._data_done - self._start)
        self._start = self._data_done = now

    def summary(self) -> dict[str, float]:
        """`images_per_s`, `data_wait` (share of iteration time, 0-1) and mean `step_time`
        (seconds) over the window; zeros before the first update."""
        images = sum(s[0] for s in self.samples)
        step = sum(s[1] for s in self.samples)
        data = sum(s[2] for s in self.samples)
        if step <= 0:
            return {"images_per_s": 0.0, "data_wait": 0.0, "step_time": 0.0}
        return {
            "images_per_s": images / step,
            "data_wait": data / step,
            "step_time": step / len(self.samples),
        }


# ---- wandb ------------------------------------------------------------------------------------
def _field(cfg: Any, key: str, default: Any = None) -> Any:
    """Read `key` from a dataclass, OmegaConf node or dict config, with a default."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def read_or_create_run_id(output_dir: str | os.PathLike) -> str:
    """The wandb run id stored in `output_dir/wandb_run_id.txt`, created on first use, so a
    restart with the same output_dir continues the same wandb run."""
    path = Path(output_dir) / RUN_ID_NAME
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    # `secrets`, not `random`/numpy: creating an id must not advance the training RNG streams.
    run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_ID_NAME}.tmp-{os.getpid()}")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class _NoCredentials(RuntimeError):
    """wandb would need to prompt for an API key."""


def _wandb_online(wandb: Any) -> bool:
    """Whether `wandb.init(mode=None)` would go online, i.e. log in: wandb's own mode (from
    WANDB_MODE and its settings files) is not offline or disabled."""
    return wandb.setup().settings.mode not in ("offline", "dryrun", "disabled")


class WandbLogger:
    """wandb run for one output_dir; every method is a no-op when disabled.

    Config fields read (all optional): `name` (backend: "wandb" | "none"), `enabled`, `project`,
    `entity`, `run_name` (default: output_dir's name), `mode` (online | offline | disabled |
    None = wandb decides, see the module docstring), `tags`, `dir` (default: output_dir; wandb
    writes `dir/wandb`). `mode` is the mode asked for; the run's own is `run.settings.mode`.

    The run id lives in `output_dir/wandb_run_id.txt`: a resume continues that wandb run, while
    a fresh start whose directory holds a dead run's records (no checkpoint) gets a new id, the
    old file being set aside with them (`set_aside_stale`): under the same id wandb would drop
    every step of the new run up to the dead run's last one.
    """

    def __init__(
        self,
        cfg: Any,
        output_dir: str | os.PathLike,
        config: dict | None = None,
        enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.run = None
        self.mode: str | None = _field(cfg, "mode")
        wanted = _field(cfg, "enabled", True) and _field(cfg, "name", "wandb") != "none"
        if enabled and wanted and self.mode != "disabled":
            try:
                self.run = self._init(cfg, config)
            except Exception as e:  # a logging back-end problem must not stop a training run
                log.warning("wandb disabled: wandb.init failed (%s: %s)", type(e).__name__, e)

    def _init(self, cfg: Any, config: dict | None) -> Any:
        import wandb  # imported only when used: it is slow to import

        run_dir = Path(_field(cfg, "dir") or self.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=_field(cfg, "project"),
            entity=_field(cfg, "entity"),
            name=_field(cfg, "run_name") or self.output_dir.resolve().name,
            tags=list(_field(cfg, "tags") or []),
            config=config,
            dir=str(run_dir),
            id=read_or_create_run_id(self.output_dir),
            resume="allow",
        )
        if self.mode is not None:
            return wandb.init(mode=self.mode, **kwargs)
        try:
            # wandb.init would show its login menu on a terminal and wait for an answer.
            if _wandb_online(wandb) and not wandb.login(prompt=False, verify=False):
                raise _NoCredentials("no API key (WANDB_API_KEY or `wandb login`)")
            return wandb.init(mode=None, **kwargs)
        except Exception as e:
            # A half-started online run keeps its id registered in wandb's service ("run ID is
            # in use"); a fresh service lets the offline run take the same id.
            if not isinstance(e, _NoCredentials):
                wandb.teardown()
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning(
                "wandb offline: %s; metrics are kept in %s for `wandb sync`",
                why,
                run_dir / "wandb",
            )
        return wandb.init(mode="offline", **kwargs)

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_image(self, key: str, image: str | os.PathLike | np.ndarray, step: int) -> None:
        """Log a picture given as a file path or an (H, W, 3) uint8 array."""
        if self.run is None:
            return
        import wandb

        data = str(image) if isinstance(image, (str, os.PathLike)) else image
        self.run.log({key: wandb.Image(data)}, step=step)

    def finish(self) -> None:
        """Close the run (idempotent)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


def max_memory_gb(device: Any) -> float:
    """Peak memory of this process in GiB: the CUDA allocator's peak on a GPU (`device`, a
    torch.device), else the resident set size's peak."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
