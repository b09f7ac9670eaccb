"""Training checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its own
shard, in parallel; any world size can load them.

Layout of `output_dir`:

    checkpoint-00001000/          one complete checkpoint (numbered by the trainer's step)
        __0_0.distcp ...          DCP data: rank r writes `__r_0.distcp`, its shard of every tensor
        .metadata                 DCP index (shapes, chunks, offsets): a pickle, read only through
                                  the restricted unpickler of `pixio.safe_load`
        meta.pt                   the trainer's small `meta` dict (torch.save, weights_only load)
        manifest.json             size and sha256 of every file above; written last
    checkpoint-last -> checkpoint-00001000    relative symlink, swapped with os.replace
    .checkpoint-00001100.tmp-<id>/  a save in progress (or killed): removed by the next save
    .checkpoint-00000900.old-<id>/  a checkpoint being deleted: removed by the next save

Save (`CheckpointManager.save`, every rank): rank 0 creates the temporary directory and writes
`meta.pt`; every rank writes its DCP shard there (fsynced) and hashes the files it wrote; the
digests are gathered to rank 0, which writes `manifest.json`, fsyncs, and renames the directory
to its numbered name. That rename is the commit: a numbered directory only ever exists complete,
so a kill at any point leaves the previous checkpoints as they were. Then `checkpoint-last` is
moved to it and retention runs. A failed save (a full disk, say) removes its temporary directory
and raises CheckpointError naming the checkpoint and the cause, on every rank.

Resume (`CheckpointManager.load_latest`, every rank): numbered checkpoints, newest first
(`checkpoint-last` is a pointer for people and tools, never a second copy of the bytes: a damaged
checkpoint is skipped once, whatever points at it). Each candidate is verified against its
manifest, every rank hashing a disjoint subset of the files (rank r the files rank r wrote, which
the load then reads from the page cache), then loaded in place with DCP, which reshards to the
current world size. A candidate that fails is logged with the one tried next; if checkpoints exist
and none loads, CheckpointError is raised and nothing on disk is changed.

Async saves (`async_save=True`): `save` returns once the state is copied to host memory; the
write and hashing run in a background thread, bound to the rank's CUDA device, writing the
staged host tensors without a CUDA stream, on the job's gloo group for host-side coordination
(`pixio.runtime.distributed.cpu_group`, created at start-up; so they never interleave with the
training loop's collectives); the commit happens in `wait()`, which the next `save`,
`load_latest` and `close` call first. A process killed before `wait()` leaves only a temporary
directory: the previous checkpoint stays the latest.

One directory on its own (names, manifest, retention, and the verified reads of every other
reader: tools, encoder readers) is `pixio.runtime.checkpoint_dir`; its names are re-exported.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from pixio.runtime.checkpoint_dir import (
    LAST_NAME,
    LEGACY,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    META_NAME,
    RANK_FILE,
    CheckpointError,
    CheckpointReader,
    DamagedCheckpointError,
    check_files,
    cleanup_temporaries,
    digest_files,
    file_digest,
    find_latest,
    first_line,
    has_checkpoints,
    load_checkpoint,
    numbered_checkpoints,
    numbered_name,
    prune_checkpoints,
    quick_check,
    read_manifest,
    read_meta,
    verify_files,
)
from pixio.runtime.distributed import cpu_group
from pixio.runtime.rng import capture_rng_state, restore_rng_state
from pixio.safe_load import SafeDCPReader, SafeLoadPlanner, read_dcp_metadata, safe_torch_load

log = logging.getLogger("pixio.checkpoint")
T = TypeVar("T")
_FULL_BELOW = 64 << 20  # free bytes under which a failed write is put down to a full disk
_PLAIN = (int, float, bool, str, type(None), torch.dtype)
_COPY_AHEAD = 10_000_000  # bytes DCP copies from the GPU ahead of the write (its default)

# Re-exported: the one-directory functions are part of this module's interface.
__all__ = [
    "LAST_NAME", "MANIFEST_FORMAT", "MANIFEST_NAME", "META_NAME", "CheckpointError",
    "CheckpointManager", "CheckpointReader", "DamagedCheckpointError", "capture_rng_state",
    "check_files", "cleanup_temporaries", "digest_files", "file_digest", "find_latest",
    "has_checkpoints", "load_checkpoint", "numbered_checkpoints", "numbered_name",
    "prune_checkpoints", "quick_check", "read_manifest", "read_meta", "restore_rng_state",
    "verify_files", "write_failure",
]  # fmt: skip


def _owner(name: str, world: int) -> int:
    """The rank that hashes file `name`: the writer of a data file (modulo the world size),
    rank 0 for the rest."""
    match = RANK_FILE.match(name)
    return int(match.group(1)) % world if match else 0


# ---- error messages ---------------------------------------------------------------------------
def _os_error(exc: BaseException | None, depth: int = 0) -> OSError | None:
    """The first OSError with an errno in an exception, its DCP failures and its chain."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, OSError) and exc.errno:
        return exc
    if isinstance(exc, CheckpointException):
        for rank in sorted(exc.failures):
            if found := _os_error(exc.failures[rank][0], depth + 1):
                return found
    return _os_error(exc.__cause__ or exc.__context__, depth + 1)


def _disk_full(directory: Path) -> bool:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < _FULL_BELOW


def write_failure(final: Path, exc: BaseException) -> str:
    """One line for a failed save. torch's zip writer turns a full disk into "enforce fail ...
    unexpected pos": the errno (or the free space) says what happened."""
    if isinstance(exc, CheckpointError):
        return str(exc)
    err = _os_error(exc)
    if err is not None:
        cause = f"{os.strerror(err.errno)} (errno {err.errno})"
    elif _disk_full(final.parent):
        full = f"{os.strerror(errno.ENOSPC)} (errno {errno.ENOSPC})"
        cause = f"{full}, judging by the free space; torch said {first_line(exc)}"
    else:
        cause = first_line(exc)
    return f"cannot write checkpoint {final}: {cause}"


# ---- small files ------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable (a rename is only on disk once the dir is synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _meta_bytes(meta: dict[str, Any], final: Path) -> bytes:
    """torch.save of `meta`, refused now (not at resume) if weights_only loading rejects it."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"cannot write checkpoint {final}: meta must be a dict")
    buf = io.BytesIO()
    torch.save(meta, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"cannot write checkpoint {final}: meta holds objects that weights_only loading "
            "refuses (use tensors, numbers, strings, lists and dicts)"
        ) from None
    return buf.getvalue()


def _bad_leaf(obj: Any, key: str = "") -> str | None:
    """Key path of the first value in `obj` that is not a tensor, a plain value or a container."""
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return None
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return f"{key or '<state>'} ({type(obj).__name__})"
    for k, v in items:
        if found := _bad_leaf(v, f"{key}.{k}" if key else str(k)):
            return found
    return None


def _holds_cuda(tree: Any) -> bool:
    """Whether a nested state holds a tensor (or DTensor shard) on a CUDA device."""
    if isinstance(tree, torch.Tensor):
        return tree.device.type == "cuda"
    if isinstance(tree, dict):
        return any(_holds_cuda(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_holds_cuda(v) for v in tree)
    return False


def _bind_device(device: int | None) -> None:
    """Initializer of the background writer thread: the rank's CUDA device (None: no CUDA)."""
    if device is not None:
        torch.cuda.set_device(device)


# ---- collectives ------------------------------------------------------------------------------
class _Comm:
    """Rank, world size and object collectives on the job's gloo group for host-side
    coordination (`pixio.runtime.distributed.cpu_group`, created at start-up; no group without
    torch.distributed). Its own group: async writes talk from a background thread while
    training uses the default group, and small objects need no GPU round trip."""

    def __init__(self) -> None:
        self.group = cpu_group()
        self.rank = dist.get_rank() if self.group is not None else 0
        self.world = dist.get_world_size() if self.group is not None else 1

    def all_gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@dataclass
class _Pending:
    """A save between its DCP write and its commit."""

    step: int
    tmp: Path
    final: Path
    started: float
    future: Future | None = None  # async: resolves to the gathered digests
    digests: list[Any] | None = None  # sync


# ---- the manager ------------------------------------------------------------------------------
class CheckpointManager:
    """Saves and resumes training checkpoints in `output_dir` (layout, protocol: module doc).

    `keep_last` newest checkpoints are kept (at least 1: the latest is never deleted), plus every
    step divisible by `keep_every`. All methods but `latest` are collective when
    torch.distributed is initialised: every rank calls them in the same order."""

    def __init__(
        self,
        output_dir: str | Path,
        keep_last: int = 2,
        keep_every: int | None = None,
        async_save: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.keep_last = max(1, keep_last)
        self.keep_every = keep_every
        self.async_save = async_save
        self.comm = _Comm()  # every rank builds the manager (the trainer, at start-up)
        self._pending: _Pending | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stager: BlockingAsyncStager | None = None

    # ---- saving ---------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Write checkpoint `step`: `state` (nested dict of tensors / DTensors / plain values)
        with DCP, each rank its shard; `meta` (small, weights_only-safe) once, by rank 0.
        Sync: returns after the commit. Async: returns once `state` is staged in host memory;
        `wait()` commits. Returns the checkpoint's final path."""
        self.wait()
        final = self.output_dir / numbered_name(step)
        began = self._agree(lambda: self._begin(final, state, meta), final)
        pending = _Pending(step, Path(self.comm.broadcast(str(began))), final, time.perf_counter())
        try:
            if self.async_save:
                staged = self._agree(lambda: self._staging(state).stage(state), final)
                pending.future = self._executor().submit(self._write, pending.tmp, staged)
                self._pending = pending
                return final
            pending.digests = self._write(pending.tmp, state)
        except (Exception, CheckpointException) as exc:
            self._fail(pending, write_failure(final, exc))
        self._commit(pending)
        return final

    def wait(self) -> None:
        """Commit the pending async save, if any (collective). Raises CheckpointError if it
        failed; its temporary files are then removed and the previous checkpoint stays."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.digests = pending.future.result()
        except (Exception, CheckpointException) as exc:
            self._fail(pending, write_failure(pending.final, exc))
        self._commit(pending)

    def close(self) -> None:
        """wait(), then free the background thread and the staging buffers."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool, self._stager = None, None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # A new thread's current CUDA device is 0: anything there that touches CUDA would
            # open a context on GPU 0 from every rank of the node. Bind it to the rank's.
            device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
            self._pool = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="pixio-ckpt",
                initializer=_bind_device,
                initargs=(device,),
            )
        return self._pool

    def _staging(self, state: dict[str, Any]) -> BlockingAsyncStager:
        if self._stager is None:
            # GPU state: pinned host buffers, kept between saves (copies run at full speed).
            self._stager = BlockingAsyncStager(cache_staged_state_dict=_holds_cuda(state))
        return self._stager

    def _agree(self, fn: Callable[[], T], final: Path) -> T:
        """Run `fn` on every rank; if it failed on any, every rank raises the same error."""
        try:
            value, error = fn(), None
        except Exception as exc:
            value, error = None, write_failure(final, exc)
        errors = [e for e in self.comm.all_gather(error) if e]
        if errors:
            raise CheckpointError(errors[0])
        return value  # type: ignore[return-value]

    def _begin(self, final: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path | None:
        """Every rank checks its state; rank 0 clears leftovers, creates the temporary
        directory and writes meta.pt into it. Returns the directory (rank 0)."""
        if bad := _bad_leaf(state):
            raise CheckpointError(f"cannot write checkpoint {final}: {bad} is not a tensor")
        if self.comm.rank != 0:
            return None
        blob = _meta_bytes(meta, final)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for path in cleanup_temporaries(self.output_dir):
            log.info("removed %s, left by an interrupted save", path)
        tmp = self.output_dir / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_synced(tmp / META_NAME, blob)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _write(self, tmp: Path, state: dict[str, Any]) -> list[Any]:
        """DCP-write this rank's shard into `tmp` and hash the files this rank wrote. Returns
        every rank's digests (or error line), gathered. Runs in the background when async."""
        comm = self.comm
        # Host tensors (a staged async save, a CPU run) are written as they are; DCP's
        # copy-ahead would run them through a CUDA stream of the thread's current device.
        ahead = _COPY_AHEAD if _holds_cuda(state) else 0
        writer = FileSystemWriter(
            tmp, single_file_per_rank=True, sync_files=True, per_thread_copy_ahead=ahead
        )
        # Plan caching: after the first save the ranks send no plans and rank 0 reuses the
        # global plan, saving O(tensors x ranks) work per save (~1 min for 5B on 256 ranks).
        planner = DefaultSavePlanner(enable_plan_caching=True)
        dcp.save(state, storage_writer=writer, planner=planner, process_group=comm.group,
                 no_dist=comm.group is None)  # fmt: skip
        try:  # errors travel as values so that every rank reaches the gather
            names = [p.name for p in tmp.iterdir() if _owner(p.name, comm.world) == comm.rank]
            local: Any = digest_files(tmp, names)
        except OSError as exc:
            local = f"cannot hash {tmp}: {first_line(exc)}"
        return comm.all_gather(local)

    def _commit(self, pending: _Pending) -> None:
        """Rank 0 writes the manifest and commits; every rank learns the outcome."""
        errors = [d for d in pending.digests or [] if isinstance(d, str)]
        if errors:
            self._fail(pending, errors[0])
        outcome = None
        if self.comm.rank == 0:
            try:
                self._commit_on_rank0(pending)
            except Exception as exc:
                outcome = write_failure(pending.final, exc)
        if outcome := self.comm.broadcast(outcome):
            self._fail(pending, outcome)

    def _commit_on_rank0(self, pending: _Pending) -> None:
        tmp, final = pending.tmp, pending.final
        files: dict[str, Any] = {k: v for d in pending.digests or [] for k, v in d.items()}
        unhashed = sorted({p.name for p in tmp.iterdir()} - set(files))
        files.update(digest_files(tmp, unhashed))  # none normally: every file has an owner
        manifest = {"format": MANIFEST_FORMAT, "step": pending.step, "world_size": self.comm.world}
        manifest["files"] = dict(sorted(files.items()))
        _write_synced(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (after a fallback): replace it
            os.replace(final, final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}"))
        os.replace(tmp, final)  # the commit
        _fsync_dir(self.output_dir)
        self._point_last(final)
        prune_checkpoints(self.output_dir, self.keep_last, self.keep_every, protect=final)
        size = sum(f["size"] for f in files.values()) / 2**30
        took = time.perf_counter() - pending.started
        log.info("saved checkpoint %s (%d files, %.2f GiB, %.1f s)", final, len(files), size, took)

    def _point_last(self, final: Path) -> None:
        """Swap `checkpoint-last` to `final` atomically; a failure only costs the pointer."""
        last = self.output_dir / LAST_NAME
        link = self.output_dir / f".{LAST_NAME}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.symlink(final.name, link)
            if last.is_dir() and not last.is_symlink():  # something else took the name
                os.replace(last, self.output_dir / f".{LAST_NAME}.old-{uuid.uuid4().hex[:8]}")
            os.replace(link, last)
            _fsync_dir(self.output_dir)
        except OSError as exc:
            link.unlink(missing_ok=True)
            log.warning("could not point %s at %s (%s); resume still finds it", last, final, exc)

    def _fail(self, pending: _Pending, message: str) -> NoReturn:
        """Remove the temporary directory (rank 0) and raise `message` on every rank."""
        if self.comm.rank == 0:
            shutil.rmtree(pending.tmp, ignore_errors=True)
        latest = find_latest(self.output_dir)
        kept = f"the latest checkpoint is still {latest}" if latest else "there is no checkpoint"
        raise CheckpointError(f"{message}; partial files removed, {kept}")

    # ---- loading --------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """Newest complete-looking checkpoint directory (manifest and sizes; no loading)."""
        return find_latest(self.output_dir)

    def load_latest(self, state: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest good checkpoint into `state` in place (resharding as needed) and
        return (path, meta); None when there is none. Collective: all ranks load the same one.
        Falls back to older checkpoints with a warning naming both; raises CheckpointError,
        changing nothing on disk, if checkpoints exist and none loads (`state` is then
        undefined)."""
        self.wait()
        plan = self.comm.broadcast(self._plan() if self.comm.rank == 0 else None)
        if isinstance(plan, str):
            raise CheckpointError(plan)
        tried = []
        for i, name in enumerate(plan):
            path = self.output_dir / name
            meta, problem = self._try_load(path, state)
            if problem is None:
                return path, meta
            tried.append(f"{name}: {problem}")
            if self.comm.rank == 0:
                then = (
                    f"falling back to {self.output_dir / plan[i + 1]}"
                    if i + 1 < len(plan)
                    else "no older checkpoint"
                )
                log.warning("cannot load checkpoint %s (%s); %s", path, problem, then)
        if not tried:
            return None
        raise CheckpointError(
            f"no checkpoint in {self.output_dir} can be loaded (nothing on disk was changed): "
            + "; ".join(tried)
        )

    def _plan(self) -> list[str] | str:
        """Rank 0: candidate names, newest first (or an error line)."""
        out = self.output_dir
        found = [p.name for _, p in reversed(numbered_checkpoints(out))]
        self._report_pointer(found)
        legacy = (
            []
            if found or not out.is_dir()
            else sorted(p.name for p in out.iterdir() if LEGACY.match(p.name))
        )
        if not legacy:
            return found
        return (
            f"{out} holds only single-file checkpoints of the old format ({', '.join(legacy)}),"
            " which training no longer resumes from: use a new output_dir (pixio.load_encoder"
            " and python -m pixio.convert still read them)"
        )

    def _report_pointer(self, found: list[str]) -> None:
        """Warn when checkpoint-last is not a symlink to the newest numbered checkpoint."""
        last = self.output_dir / LAST_NAME
        if not os.path.lexists(last):
            return
        target = os.readlink(last) if last.is_symlink() else None
        if target is None or target not in found:
            newest = self.output_dir / found[0] if found else "nothing"
            what = target or "no checkpoint (not a symlink)"
            log.warning(
                "%s points at %s, not at a checkpoint of this run; falling back to %s",
                last,
                what,
                newest,
            )
        elif target != found[0]:
            log.warning(
                "%s points at %s, but %s is newer (its save was interrupted after the commit);"
                " trying the newest first",
                last,
                target,
                found[0],
            )

    def _try_load(self, path: Path, state: dict[str, Any]) -> tuple[Any, str | None]:
        """Verify, then load `path` into `state`: (meta, None), or (None, why) on every rank."""
        comm = self.comm
        if problems := self._verify(path):
            return None, "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
        try:
            md, meta, error = read_dcp_metadata(path), safe_torch_load(path / META_NAME), None
            if not isinstance(meta, dict):
                error = f"{META_NAME} holds a {type(meta).__name__}, not a dict"
        except Exception as exc:
            md, meta, error = None, None, first_line(exc)
        if errors := [e for e in comm.all_gather(error) if e]:
            return None, errors[0]
        try:
            reader, planner = SafeDCPReader(path, md), SafeLoadPlanner(path)
            group = comm.group
            dcp.load(
                state,
                storage_reader=reader,
                planner=planner,
                process_group=group,
                no_dist=group is None,
            )
        except (Exception, CheckpointException) as exc:  # the latter is a BaseException
            error = first_line(exc)
        errors = [e for e in comm.all_gather(error) if e]
        return (None, errors[0]) if errors else (meta, None)

    def _verify(self, path: Path) -> list[str]:
        """Size and checksum of every file against the manifest, each rank its own share."""
        comm = self.comm
        try:
            files = read_manifest(path)["files"]
            mine = {n: e for n, e in files.items() if _owner(n, comm.world) == comm.rank}
            local = check_files(path, mine, hashes=True)
        except (OSError, ValueError) as exc:
            local = [str(exc)]
        gathered = comm.all_gather(local)
        return list(dict.fromkeys(p for problems in gathered for p in problems))
