"""What every job's `main(cfg)` runs inside: CPU threads, process group, an exclusive lock on
`output_dir`, logging, one-line errors, and clean-up.

    with run_job(cfg.output_dir, cfg.train.device, cfg.train.cpu_threads) as info:
        ...build and fit...

- CPU threads: torch's thread count for the job's life, from `train.cpu_threads`
  (`pixio.runtime.threads`; restored on exit), logged in one line with the OpenMP wait policy
  and the CPU affinity.

- Lock: rank 0 holds `fcntl.flock` on `output_dir/.pixio.lock` for the life of the run, so a
  second run started in the same `output_dir` stops with a message naming the holder (host,
  pid, SLURM job) instead of interleaving checkpoints and metrics. The kernel drops the lock when
  the process dies, so a killed or requeued job leaves no stale lock. Where the file system has
  no working flock, the lock falls back to the holder recorded in the file: a dead process on
  this host, or the same SLURM job (a requeue), is taken over with a warning.
- Errors a user can act on (configuration, input data, checkpoints, the lock, an unwritable or
  full disk) end as one `error: ...` line on stderr and in `train.log`, exit code 1 (2 for
  configuration).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixio.runtime.config import ConfigError, check_cpu_threads
from pixio.runtime.threads import cpu_threads

if TYPE_CHECKING:  # torch is imported when a job starts, not when an app checks its config
    from pixio.runtime.distributed import DistInfo

log = logging.getLogger("pixio.job")

LOCK_NAME = ".pixio.lock"
# A requeued job whose earlier run died with its node may meet that run's lock on a network file
# system until the server notices (NFS lease): wait this long before taking it over.
REQUEUE_LOCK_WAIT_S = 120.0
# OSErrors about the output location that deserve one line rather than a traceback.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


class RunLockedError(RuntimeError):
    """Another run holds the output directory."""


class OutputDirError(RuntimeError):
    """The output directory cannot be created or written."""


class DataError(RuntimeError):
    """Input data the user must fix; the message names the file, list or split."""


def job_errors() -> tuple[type[Exception], ...]:
    """The errors a user can act on (one line, no traceback)."""
    from pixio.runtime.checkpointing import CheckpointError
    from pixio.safe_load import UnsafeCheckpointError

    return (
        ConfigError, CheckpointError, UnsafeCheckpointError, RunLockedError, OutputDirError, DataError,
    )  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "JOB_ERRORS":  # the tuple, built on use (it imports torch)
        return job_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _holder() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """Exclusive, process-lifetime lock on one output directory (see module doc)."""

    def __init__(self, output_dir: str | os.PathLike, wait_s: float = REQUEUE_LOCK_WAIT_S) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.wait_s = wait_s
        self._file = None

    def acquire(self) -> OutputDirLock:
        """Take the lock or raise RunLockedError naming the holder."""
        f = open(self.path, "a+", encoding="utf-8")
        try:
            self._flock(f)
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()) + "\n")
        f.flush()
        self._file = f
        return self

    def _flock(self, f) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = self.holder()
                same_job = holder.get("slurm_job") and holder["slurm_job"] == os.environ.get(
                    "SLURM_JOB_ID"
                )
                if not same_job or time.monotonic() > deadline:
                    raise RunLockedError(self._message(holder)) from None
                time.sleep(2.0)
            except OSError as err:  # no flock on this file system: judge by the recorded holder
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._check_recorded_holder()
                return

    def _check_recorded_holder(self) -> None:
        holder = self.holder()
        ours = holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID")
        here = holder.get("host") == socket.gethostname()
        if holder and not ours and not (here and not _pid_alive(int(holder.get("pid", 0)))):
            raise RunLockedError(
                self._message(holder) + " (no flock here: delete the lock file if that run is gone)"
            )
        if holder:
            log.warning("taking over the lock of %s (no flock on this file system)", holder)

    def holder(self) -> dict[str, object]:
        """What the lock file says about the run that holds it ({} when unreadable)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8").strip() or "{}")
        except (OSError, ValueError):
            return {}

    def _message(self, holder: dict[str, object]) -> str:
        who = ", ".join(f"{k} {v}" for k, v in holder.items() if v) or "unknown"
        return (
            f"{self.path.parent} is in use by another run ({who}); two runs in one output_dir "
            f"would overwrite each other's checkpoints: wait for it, stop it, or choose another output_dir"
        )

    def release(self) -> None:
        """Drop the lock (the file stays; it is rewritten by the next holder)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def prepare_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` and check it is writable; OutputDirError naming it otherwise."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(
            f"cannot write to output_dir {out.resolve()}: {err.strerror or err}"
        ) from None
    return out


def _lock_on_rank0(output_dir: str | os.PathLike, info: DistInfo) -> OutputDirLock | None:
    """Rank 0 takes the lock; every rank learns the outcome, so all stop together."""
    import torch.distributed as dist

    from pixio.runtime.distributed import is_dist

    lock, problem = None, None
    if info.rank == 0:
        try:
            prepare_output_dir(output_dir)
            lock = OutputDirLock(output_dir).acquire()
        except (RunLockedError, OutputDirError) as err:
            problem = (type(err).__name__, str(err))
    if is_dist():
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise (RunLockedError if problem[0] == "RunLockedError" else OutputDirError)(problem[1])
    return lock


def error_line(err: BaseException) -> str | None:
    """The one-line message for an error a user can act on; None for anything else (a bug)."""
    if isinstance(err, job_errors()):
        return str(err)
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write{where}: {err.strerror} (errno {err.errno})"
    return None


def _to_log_files(line: str) -> None:
    """Append `line` to the log files (train.log), not the console (which gets it once)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@contextlib.contextmanager
def run_job(
    output_dir: str | os.PathLike, device: str = "auto", threads: object = "auto"
) -> Iterator[DistInfo]:
    """CPU threads (`train.cpu_threads`), process group, output_dir lock, logging; one-line
    errors; release, clean-up and the process's own thread count back on exit."""
    from pixio.runtime.distributed import cleanup, init_distributed
    from pixio.runtime.logging import setup_logging

    lock = None
    try:
        check_cpu_threads(threads)
        with cpu_threads(threads) as choice:
            info = init_distributed(device=device)
            lock = _lock_on_rank0(output_dir, info)
            setup_logging(Path(output_dir), info.rank)
            log.info(choice.describe())
            yield info
    except Exception as err:
        line = error_line(err)
        if line is None:
            raise
        kind = "config error" if isinstance(err, ConfigError) else "error"  # as the CLI says it
        _to_log_files(f"{kind}: {line}")
        print(f"{kind}: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2 if isinstance(err, ConfigError) else 1) from None
    finally:
        if lock is not None:
            lock.release()
        cleanup()
