"""Full training checkpoints: atomic writes, retention, resume look-up, RNG state.

Layout of `output_dir`:
- `checkpoint-{step:08d}.pth`: numbered checkpoints, pruned by the retention policy;
- `checkpoint-last.pth`: always the newest complete checkpoint (a hard link to the numbered
  file of the same save, or a copy where the file system has no hard links);
- `.checkpoint-*.tmp-<pid>`: temporary files of a save in progress; the next save removes
  those a killed save left behind.

Every file name that a reader looks at only ever points at a complete, fsynced file, because
files are written under a temporary name and moved into place with `os.replace` (atomic on
POSIX). One process (rank 0) writes to an `output_dir` at a time.

Checkpoints are loaded with `torch.load(weights_only=True)`, so the state must hold only
tensors, numbers, strings, None and (nested) lists/tuples/dicts of them; a file that needs
pickled code is refused and never executed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from pixio.checkpoint import UnsafeCheckpointError, safe_torch_load

LAST_NAME = "checkpoint-last.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d{8,})\.pth$")
_TMP_GLOB = ".checkpoint-*.tmp-*"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded safely; the message names the file."""


# ---- writing ----------------------------------------------------------------------------------
def numbered_name(step: int) -> str:
    """File name of the numbered checkpoint for `step`."""
    return f"checkpoint-{step:08d}.pth"


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (a rename is only on disk once the dir is synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create `path` with `write(file)`, then flush and fsync it; remove it on any error."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` as `dst` (no extra I/O); copy and fsync where links are unsupported."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        _write_synced(dst, lambda f: _copy_into(src, f))


def _copy_into(src: Path, f: BinaryIO) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, length=16 << 20)


def cleanup_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by a killed save; returns what was removed."""
    removed = sorted(Path(output_dir).glob(_TMP_GLOB))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def save_checkpoint(
    state: dict[str, Any],
    output_dir: str | os.PathLike,
    step: int,
    keep_last: int = 2,
    keep_every: int | None = None,
) -> Path:
    """Atomically write `checkpoint-{step:08d}.pth` and `checkpoint-last.pth`, then prune.

    Order: full temp file (fsynced) -> hard link swapped onto checkpoint-last.pth -> temp renamed
    to the numbered name -> directory fsync -> retention. A kill at any point leaves the previous
    or the new checkpoint-last.pth, both complete. Returns the numbered path.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cleanup_temporaries(out)
    final, last = out / numbered_name(step), out / LAST_NAME
    tmp, tmp_last = _tmp_path(final), _tmp_path(last)
    try:
        _write_synced(tmp, lambda f: torch.save(state, f))
        _link_or_copy(tmp, tmp_last)
        os.replace(tmp_last, last)
        os.replace(tmp, final)
        _fsync_dir(out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_last.unlink(missing_ok=True)
    prune_checkpoints(out, keep_last, keep_every)
    return final


# ---- retention --------------------------------------------------------------------------------
def numbered_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoints in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NUMBERED.match(p.name))]
    return sorted(found)


def prune_checkpoints(
    output_dir: str | os.PathLike, keep_last: int = 2, keep_every: int | None = None
) -> list[Path]:
    """Keep the newest `keep_last` numbered checkpoints and every step % keep_every == 0;
    delete the rest (checkpoint-last.pth is never touched). Returns the deleted paths."""
    found = numbered_checkpoints(output_dir)
    recent = {step for step, _ in found[len(found) - keep_last :]} if keep_last > 0 else set()
    deleted = []
    for step, path in found:
        if step in recent or (keep_every and step % keep_every == 0):
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
    return deleted


# ---- reading ----------------------------------------------------------------------------------
def looks_loadable(path: str | os.PathLike) -> bool:
    """Cheap completeness check: torch.save writes a zip archive whose directory is at the
    end, so a truncated or empty file fails it."""
    path = Path(path)
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """checkpoint-last.pth when it looks complete, else the newest complete numbered one."""
    last = Path(output_dir) / LAST_NAME
    if looks_loadable(last):
        return last
    for _, path in reversed(numbered_checkpoints(output_dir)):
        if looks_loadable(path):
            return path
    return None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load(weights_only=True)`; a file needing pickled code raises CheckpointError."""
    path = Path(path)
    try:
        return safe_torch_load(path, map_location)
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({e})") from e


# ---- random number generators -----------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as tensors/ints/lists only, so the
    result survives `weights_only=True` loading."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices present in
    both the checkpoint and this process."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), device)
