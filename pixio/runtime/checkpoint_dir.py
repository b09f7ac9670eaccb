"""One training checkpoint directory on disk: its name, its manifest, retention, and reads
verified against the manifest.

A checkpoint directory (`checkpoint-<step>/`, committed by `CheckpointManager`) holds the DCP data
files (`__<rank>_0.distcp`), DCP's `.metadata`, the trainer's `meta.pt` and `manifest.json`
(size and sha256 of each of them). No reader uses a file's bytes before the file matches the
manifest: resume (`CheckpointManager`, each rank its share of the files) and, in one process,
`read_meta`, `load_checkpoint` and the encoder readers of `pixio.checkpoint`, which all go
through `CheckpointReader`. A file that does not match raises `DamagedCheckpointError`: one line
naming the directory, the file, and the older checkpoint to read instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from pixio.safe_load import (
    METADATA_NAME,
    dcp_key_paths,
    load_dcp_entries,
    read_dcp_metadata,
    safe_error_text,
    safe_torch_load,
    set_path,
)

log = logging.getLogger("pixio.checkpoint")

LAST_NAME = "checkpoint-last"
META_NAME = "meta.pt"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pixio-dcp-checkpoint/1"
NUMBERED = re.compile(r"^checkpoint-(\d{8,})$")
LEGACY = re.compile(r"^checkpoint-(\d{8,}|last)\.pth$")  # single-file format before DCP
RANK_FILE = re.compile(r"^__(\d+)_")  # DCP data file written by rank N
_LEFTOVERS = (".checkpoint-*.tmp-*", ".checkpoint-*.old-*")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or none can be loaded; the message names it and why."""


class DamagedCheckpointError(CheckpointError, ValueError):
    """A checkpoint directory whose files do not match its manifest, or that has none: refused
    before any of its bytes are used. A ValueError too, like every refused input of the
    encoder readers."""


def first_line(exc: BaseException) -> str:
    """`Type: first line` of an exception (torch's weights_only advice left out); a DCP failure
    gives its lowest failing rank's."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank = min(exc.failures)
        return f"rank {rank}: {first_line(exc.failures[rank][0])}"
    lines = safe_error_text(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ---- names and look-up ------------------------------------------------------------------------
def numbered_name(step: int) -> str:
    """Directory name of the checkpoint of `step`."""
    return f"checkpoint-{step:08d}"


def numbered_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoint directories in `output_dir`, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := NUMBERED.match(p.name))]
    return sorted((step, p) for step, p in found if p.is_dir())


def has_checkpoints(output_dir: str | os.PathLike) -> bool:
    """Whether `output_dir` holds any checkpoint, damaged or of the old single-file format
    (a run there must resume from one or stop, never start over)."""
    out = Path(output_dir)
    return bool(numbered_checkpoints(out)) or (
        out.is_dir() and any(LEGACY.match(p.name) for p in out.iterdir())
    )


def find_latest(output_dir: str | os.PathLike, before: int | None = None) -> Path | None:
    """Newest numbered checkpoint (older than step `before`, when given) that looks complete
    (manifest, file sizes); reads no data."""
    for step, path in reversed(numbered_checkpoints(output_dir)):
        if (before is None or step < before) and not quick_check(path):
            return path
    return None


def cleanup_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete what interrupted saves and deletions left behind; returns what was removed."""
    removed = sorted(p for pattern in _LEFTOVERS for p in Path(output_dir).glob(pattern))
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def _remove_checkpoint(path: Path) -> None:
    """Rename out of the numbered namespace first (atomic), then delete the files."""
    trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
        shutil.rmtree(trash)
    except OSError as exc:
        log.warning("could not delete old checkpoint %s: %s", path, exc)


def prune_checkpoints(
    output_dir: str | os.PathLike,
    keep_last: int = 2,
    keep_every: int | None = None,
    protect: Path | None = None,
) -> list[Path]:
    """Keep the newest `keep_last` checkpoints (all of them while there are fewer), every
    step % keep_every == 0 and `protect`; delete the others. Returns the deleted paths."""
    found = numbered_checkpoints(output_dir)
    keep = {p for _, p in found[-keep_last:]} if keep_last > 0 else set()
    keep |= {p for step, p in found if keep_every and step % keep_every == 0}
    deleted = [p for _, p in found if p not in keep and p != protect]
    for path in deleted:
        _remove_checkpoint(path)
    return deleted


# ---- manifest and integrity -------------------------------------------------------------------
def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file (hashlib releases the GIL: threads hash in parallel)."""
    digest, size, buf = hashlib.sha256(), 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return {"size": size, "sha256": digest.hexdigest()}


def digest_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """file_digest of several files of `directory`, a few at a time."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(directory / n), names), strict=True))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint directory `path`; ValueError saying what is wrong with it."""
    file = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{MANIFEST_NAME} is missing") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{MANIFEST_NAME} is unreadable ({exc})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise ValueError(f"{MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest")
    for name, entry in files.items():
        if Path(name).name != name or not isinstance(entry, dict) or "size" not in entry:
            raise ValueError(f"{MANIFEST_NAME} has a malformed entry {name!r}")
    return manifest


def check_files(directory: Path, expected: dict[str, dict[str, Any]], hashes: bool) -> list[str]:
    """Problems of the files against their manifest entries: missing, size, and (with
    `hashes`) checksum."""
    problems, to_hash = [], []
    for name, want in sorted(expected.items()):
        try:
            size = (directory / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes instead of {want['size']}")
        elif hashes:
            to_hash.append(name)
    for name, got in digest_files(directory, to_hash).items():
        if got["sha256"] != expected[name].get("sha256"):
            problems.append(f"{name} does not match its checksum")
    return problems


def quick_check(path: Path) -> list[str]:
    """Problems found from the manifest and file sizes alone (no data read)."""
    try:
        return check_files(path, read_manifest(path)["files"], hashes=False)
    except ValueError as exc:
        return [str(exc)]


def verify_files(path: str | os.PathLike, names: Iterable[str]) -> None:
    """Check files `names` of checkpoint directory `path` against its manifest (listed there,
    present, size, sha256) before their bytes are used; DamagedCheckpointError otherwise."""
    path = Path(path)
    try:
        listed = read_manifest(path)["files"]
    except ValueError as exc:
        raise damaged(path, [str(exc)]) from None
    wanted = sorted(set(names))
    problems = [f"{n} is not listed in {MANIFEST_NAME}" for n in wanted if n not in listed]
    problems += check_files(path, {n: listed[n] for n in wanted if n in listed}, hashes=True)
    if problems:
        raise damaged(path, problems)


def damaged(path: Path, problems: list[str]) -> DamagedCheckpointError:
    """The one-line refusal of checkpoint `path`: its first problem, and the newest older
    checkpoint next to it that looks complete (what to read instead), or that there is none."""
    real = path.resolve()
    shown = f"{path} (= {real.name})" if path.is_symlink() else str(path)
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    match = NUMBERED.match(real.name)
    older = find_latest(real.parent, before=int(match.group(1))) if match else None
    instead = (
        f"the next older checkpoint is {older}: read that one instead"
        if older
        else f"there is no older checkpoint next to it in {real.parent}"
    )
    return DamagedCheckpointError(f"checkpoint {shown} is damaged: {problems[0]}{more}; {instead}")


def state_digest(path: str | os.PathLike) -> str:
    """sha256 identifying the saved tensors of checkpoint directory `path`: of the name, size and
    sha256 of every DCP data file its manifest lists. Not `.metadata` (it records the save's
    temporary path and a random id: two saves of the same tensors differ there) nor `meta.pt`
    (iteration, RNG states, data positions). Reads the manifest alone: every read verifies the
    files it uses against these entries (`verify_files`). ValueError without a valid manifest."""
    files = read_manifest(path)["files"]
    data = sorted((n, e["size"], e.get("sha256")) for n, e in files.items() if RANK_FILE.match(n))
    if not data or any(not isinstance(sha, str) for _, _, sha in data):
        raise ValueError(f"{path}: {MANIFEST_NAME} lists no data file with its sha256")
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


# ---- verified reads in one process (tools, encoder readers) -----------------------------------
class CheckpointReader:
    """Reads parts of one checkpoint directory in this process. Each file is verified against
    the manifest once, before its bytes are used: `.metadata` on opening, then the data files
    that hold the entries of each `verify` / `load`, and no others (a reader of one module
    never hashes a file that holds none of its tensors)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._verified: set[str] = set()
        self._verify([METADATA_NAME])
        self.metadata = read_dcp_metadata(self.path)
        self.key_paths = dcp_key_paths(self.metadata)  # flat key -> nested path of the state

    def _verify(self, names: Iterable[str]) -> None:
        todo = set(names) - self._verified
        if todo:
            verify_files(self.path, todo)
            self._verified |= todo

    def verify(self, keys: Iterable[str]) -> None:
        """Verify the data files holding flat entries `keys` (each file once per reader)."""
        keys = set(keys)
        storage = self.metadata.storage_data.items()
        self._verify({info.relative_path for index, info in storage if index.fqn in keys})

    def load(self, keys: Iterable[str]) -> dict[str, Any]:
        """Flat entries `keys` as full tensors (or objects), their files verified first."""
        keys = list(keys)
        self.verify(keys)
        return load_dcp_entries(self.path, keys, self.metadata)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta` dict of checkpoint directory `path` (verified, weights_only)."""
    verify_files(path, [META_NAME])
    try:
        meta = safe_torch_load(Path(path) / META_NAME)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read {META_NAME} ({first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: {META_NAME} holds a {type(meta).__name__}, not a dict")
    return meta


def load_checkpoint(
    path: str | os.PathLike, sections: tuple[str, ...] = ("model",)
) -> dict[str, Any]:
    """`meta` plus the saved state's top-level `sections` as full tensors, in one process
    whatever the saving world size (e.g. `load_checkpoint(p)["model"]`). Only the requested
    entries are read, from files verified against the manifest. For tools and tests."""
    try:
        reader = CheckpointReader(path)
        paths = {k: p for k, p in reader.key_paths.items() if p[0] in sections}
        flat = reader.load(paths)
    except DamagedCheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, CheckpointException) as exc:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({first_line(exc)})"
        ) from None
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        set_path(nested, paths[key], value)
    return {**read_meta(path), **nested}
