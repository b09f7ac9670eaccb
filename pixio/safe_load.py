"""Loading checkpoints without executing pickled code.

- `safe_torch_load`: `torch.load(weights_only=True)`. A file that needs pickled code raises
  `UnsafeCheckpointError` naming the file and the refused object; torch's advice to turn the check
  off (`weights_only=False`, `add_safe_globals`) is never repeated.
- DCP directories (`torch.distributed.checkpoint`): torch's `FileSystemReader` reads `.metadata`
  with plain `pickle.load`, and its default load planner reads non-tensor entries with
  `weights_only=False`; either would run code planted in the file. `SafeDCPReader` reads
  `.metadata` through `MetadataUnpickler`, which admits only the classes DCP metadata is made of
  (`METADATA_GLOBALS` plus torch dtypes, which are values, not callables), and `SafeLoadPlanner`
  loads non-tensor entries with `weights_only=True`. Tensor records are already read with
  `weights_only=True` by torch.
- `load_dcp_entries`: a single-process load of chosen flat keys; only their bytes are read.
- Error texts: torch's weights_only failure advises re-running with the check off. No error
  raised here repeats it (`safe_error_text` replaces it by the refused object), whether the
  file holds pickled code or is merely damaged (zeros in a record header read as pickle
  opcode 0).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

METADATA_NAME = ".metadata"

# dcp.save/load warn on every single-process call; here that is intended (tools, 1-process runs).
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed is (disabled|unavailable)", category=UserWarning
)

# Every global a DCP `.metadata` pickle refers to (torch 2.4 - 2.14 FileSystemWriter with the
# default planner). Constructing any of them runs no code of the file's choosing.
_DCP_MD = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_MD, "Metadata"),
        (_DCP_MD, "MetadataIndex"),
        (_DCP_MD, "TensorStorageMetadata"),
        (_DCP_MD, "BytesStorageMetadata"),
        (_DCP_MD, "ChunkStorageMetadata"),
        (_DCP_MD, "TensorProperties"),
        (_DCP_MD, "StorageMeta"),
        (_DCP_MD, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
        ("pathlib", "PurePosixPath"),
        ("pathlib._local", "PosixPath"),  # Python >= 3.13 spells it so
        ("collections", "OrderedDict"),
    }
)
_DTYPE_NAMES = frozenset(n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype))

# The cause inside torch's weights_only error, without its advice to disable the check.
_TORCH_CAUSE = re.compile(
    r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+|Unsupported operand \d+"
    r"|Unsupported class [\w.]+)"
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that needs pickled code to load; refused, never executed."""


def unsafe_error(source: str | Path, cause: str) -> UnsafeCheckpointError:
    """The refusal message: names the file and the refused object, never how to bypass it."""
    return UnsafeCheckpointError(
        f"refusing to load {source}: it holds pickled code or objects ({cause}); only tensors "
        "and plain containers are accepted, and nothing from the file was executed"
    )


def _torch_cause(text: str) -> str:
    match = _TORCH_CAUSE.search(text)
    return match.group(1) if match else "an object that is not plain data"


def safe_error_text(err: BaseException) -> str:
    """The text of an error from torch.load or DCP, except that torch's weights_only failure
    (which advises turning the check off) becomes the object it refused."""
    text = str(err)
    if "weights_only" not in text and "add_safe_globals" not in text:
        return text
    return f"not plain tensor data ({_torch_cause(text)})"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def read_failure(err: BaseException, source: str | Path) -> Exception:
    """One-line error for a failed read of `source` by torch.load or DCP: our own ValueErrors
    as they are, torch's weights_only refusal as UnsafeCheckpointError, anything else as
    `cannot read <source>: <torch's first line>`."""
    text = str(err)
    if isinstance(err, ValueError) and not isinstance(err, pickle.UnpicklingError):
        return err
    if not text.startswith("Weights only load failed"):
        return ValueError(f"cannot read {source}: {_first_line(safe_error_text(err)) or repr(err)}")
    cause = _torch_cause(text)
    if cause.startswith("Unsupported operand"):  # not a pickle at all: damage more likely than code
        return UnsafeCheckpointError(
            f"refusing to load {source}: it is damaged or holds pickled code ({cause}); nothing "
            "from the file was executed"
        )
    return unsafe_error(source, cause)


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)`; pickled code raises UnsafeCheckpointError (never run),
    a damaged file a ValueError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # `from None`: torch's text (kept out of the message) advises disabling the check.
        raise read_failure(err, path) from None


# ---- DCP metadata -----------------------------------------------------------------------------
class _Refused(pickle.UnpicklingError):
    pass


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global outside METADATA_GLOBALS and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS or (module == "torch" and name in _DTYPE_NAMES):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name} is not one of the classes DCP metadata is made of")


def _check_metadata(md: Any, file: Path) -> Metadata:
    """Shape checks, and every data file named by the metadata lies inside the checkpoint."""
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise ValueError(f"cannot read {file}: not DCP metadata ({type(md).__name__})")
    for info in md.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(name, str):
            raise ValueError(f"cannot read {file}: malformed storage entry {info!r}")
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"cannot read {file}: data file {name!r} is outside the checkpoint")
    return md


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The `.metadata` of DCP checkpoint directory `path` (or that file), read safely."""
    path = Path(path)
    file = path / METADATA_NAME if path.is_dir() else path
    with open(file, "rb") as f:
        try:
            md = MetadataUnpickler(f).load()
        except _Refused as err:
            raise unsafe_error(file, str(err)) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"cannot read {file}: damaged DCP metadata ({err})") from None
    return _check_metadata(md, file)


class SafeDCPReader(FileSystemReader):
    """FileSystemReader whose metadata goes through MetadataUnpickler (optionally pre-read)."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # DCP asks for per-rank metadata only as a fallback
        md = self._metadata if rank is None else None
        if md is None:
            md = read_dcp_metadata(self._get_metadata_path(rank))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def set_path(root: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Set `root[path[0]][path[1]]... = value`, creating dicts (lists under int keys)."""
    node: Any = root
    for key, nxt in zip(path[:-1], path[1:], strict=True):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            node[key] = empty if node[key] is None else node[key]
        else:
            node.setdefault(key, empty)
        node = node[key]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor entries with weights_only=True."""

    def __init__(self, source: str | Path = "checkpoint", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise read_failure(err, f"{self.source} (entry {fqn})") from None
        # Into the caller's dict: without flattening, self.state_dict may be a copy of it.
        set_path(self.original_state_dict, self.mappings.get(fqn, (fqn,)), obj)


# ---- partial loads ----------------------------------------------------------------------------
def _placeholder(meta: Any) -> Any:
    if isinstance(meta, TensorStorageMetadata):
        return torch.empty(meta.size, dtype=meta.properties.dtype)
    return None  # a non-tensor entry: replaced by the loaded object


def load_dcp_entries(
    path: str | Path, keys: Iterable[str], metadata: Metadata | None = None
) -> dict[str, Any]:
    """Load the flat DCP entries `keys` of checkpoint directory `path` into this process
    (full tensors, any saving world size). Only those entries' bytes are read."""
    md = metadata if metadata is not None else read_dcp_metadata(path)
    state = {k: _placeholder(md.state_dict_metadata[k]) for k in keys}
    if state:
        try:
            dcp.load(
                state,
                storage_reader=SafeDCPReader(path, md),
                planner=SafeLoadPlanner(path, flatten_state_dict=False),
                no_dist=True,
            )
        except CheckpointException as exc:  # one process: its own error, not DCP's wrapper
            raise read_failure(exc.failures[min(exc.failures)][0], path) from None
    return state


def dcp_key_paths(md: Metadata) -> dict[str, tuple[Any, ...]]:
    """Flat key -> nested path of the saved state (from the default planner's mapping)."""
    mapping = md.planner_data
    valid = isinstance(mapping, dict) and all(
        isinstance(p, tuple) and p and all(isinstance(k, (str, int)) for k in p)
        for p in mapping.values()
    )
    paths = mapping if valid else {}
    return {k: paths.get(k, (k,)) for k in md.state_dict_metadata}
