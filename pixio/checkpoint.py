"""Encoder checkpoint formats: read any supported file safely, load into an encoder, save.

Supported inputs of `load_encoder`: a reference encoder `.pth` (plain state dict); a training
checkpoint directory (`torch.distributed.checkpoint`, e.g. `output_dir/checkpoint-last`), from
which only the tensors of one trained module are read (never the optimiser state, never the other
modules); a single-file training checkpoint `.pth` with a `'model'` entry; a `.safetensors` file;
a Hugging Face Pixio folder. Wrapper parts are dropped: an MAE's decoder, a distillation
student's `last_proj`. Nothing is unpickled except through `weights_only=True` or the restricted
DCP metadata reader.

Trained modules: the trainer saves `{"model": {name: state}, "optimizer": {name: state}}`, one
name per trained module ("mae" in pre-training, e.g. "student_pixio_vith16" in distillation).
`module` picks one by name; None picks the only one and is an error when there are several. In a
`.pth` file a module level is a dict of dicts, at the top or under its `'model'` entry.

Integrity: a training checkpoint directory is read through
`pixio.runtime.checkpoint_dir.CheckpointReader`, which checks `.metadata` and every data file
holding the chosen module's tensors against `manifest.json` (size, sha256) before using them;
a mismatch raises `DamagedCheckpointError` (a ValueError), one line naming the directory, the
file and the older checkpoint to read instead. Every reader of this module (`load_encoder`,
`read_state_dict`, `broadcast_encoder_state`, `read_module_states`) gets it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pixio.architecture import (
    ArchitectureError,
    compare,
    config_architecture,
    from_metadata,
    model_architecture,
    resolve,
    size_mismatch,
    to_metadata,
)
from pixio.hf import hf_to_pixio_state
from pixio.models.encoder import PixioEncoder
from pixio.models.registry import build_encoder
from pixio.runtime.checkpoint_dir import (
    MANIFEST_NAME,
    META_NAME,
    CheckpointError,
    CheckpointReader,
    DamagedCheckpointError,
    read_meta,
    state_digest,
)
from pixio.safe_load import METADATA_NAME, UnsafeCheckpointError, safe_error_text, safe_torch_load

__all__ = [
    "ArchitectureError",
    "DamagedCheckpointError",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "checkpoint_digest",
    "encoder_state",
    "is_dcp_checkpoint",
    "load_encoder",
    "load_encoder_state",
    "read_architecture",
    "read_module_states",
    "read_state_dict",
    "safe_torch_load",
    "save_encoder",
    "save_mae",
    "save_state_dict",
    "trained_modules",
]

# Keys that belong to wrappers around the encoder, not to the encoder itself.
NON_ENCODER_PREFIXES = ("decoder_", "mask_token", "last_proj.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STATE_ENTRIES = ("model", "state_dict", "student")


def _strip_wrappers(sd: dict[str, Any]) -> dict[str, Any]:
    """Drop DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes."""
    out = {}
    for key, value in sd.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _hf_folder_state(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors file in this Hugging Face folder")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def is_dcp_checkpoint(path: str | Path) -> bool:
    """True for a `torch.distributed.checkpoint` directory (it holds `.metadata`)."""
    return Path(path).is_dir() and (Path(path) / METADATA_NAME).is_file()


def _pick_module(names: list[str], module: str | None, source: str | Path) -> str:
    """The trained module to read: `module`, or the only one when None (ValueError otherwise)."""
    listed = ", ".join(repr(n) for n in names)
    if module is None:
        if len(names) == 1:
            return names[0]
        raise ValueError(
            f"{source} holds {len(names)} trained modules ({listed}): pass module=... to pick one"
        )
    if module not in names:
        raise ValueError(f"{source} has no trained module {module!r}; it holds {listed}")
    return module


def _module_entries(reader: CheckpointReader) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Trained module name -> its tensor entries (flat key -> nested path) in a DCP training
    checkpoint (entry "model", then the module name)."""
    path, md = reader.path, reader.metadata
    paths = {k: p for k, p in reader.key_paths.items() if p[0] == "model"}
    if not paths:
        raise ValueError(f"{path}: this checkpoint directory has no 'model' entry")
    # Parameters right under "model" (no module level): earlier development versions wrote that
    # flat layout. Reading it as modules would name every parameter a module, so refuse it.
    if any(len(p) < 3 for p in paths.values()):
        raise ValueError(
            f"{path}: its 'model' entry holds parameters, not named modules: a checkpoint of an "
            "earlier development version, which this version does not read"
        )
    modules: dict[str, dict[str, tuple[Any, ...]]] = {str(p[1]): {} for p in paths.values()}
    for key, p in paths.items():
        if isinstance(md.state_dict_metadata[key], TensorStorageMetadata):
            modules[str(p[1])][key] = p
    return modules


def trained_modules(path: str | Path) -> list[str]:
    """Names of the trained modules of training checkpoint directory `path` (from its
    `.metadata`, verified first)."""
    return sorted(_module_entries(CheckpointReader(path)))


def read_module_states(
    path: str | Path, modules: Sequence[str | None]
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(name, tensors) of each of `modules` (None: the only one) of training checkpoint
    directory `path`, one module in memory at a time, keys relative to the module. Every file
    that holds them is verified before the first is yielded (so a damaged file stops the read
    before anything is written from it); only their tensors are read."""
    reader = CheckpointReader(path)
    entries = _module_entries(reader)
    names = [_pick_module(sorted(entries), module, path) for module in modules]
    reader.verify(key for name in names for key in entries[name])
    for name in names:
        chosen = entries[name]
        flat = reader.load(chosen)
        yield name, {".".join(map(str, chosen[k][2:])): v for k, v in flat.items()}


def _is_module_level(obj: Any) -> bool:
    """A dict of state dicts (trained modules by name) rather than a state dict."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, dict) for v in obj.values())


def _pth_state(obj: Any, module: str | None, source: Path) -> Any:
    """The state dict in a loaded `.pth` object: `module` at the top level or under the first
    STATE_ENTRIES entry; else that entry, and its only module if it holds named modules."""
    if module is not None and isinstance(obj, dict) and isinstance(obj.get(module), dict):
        return obj[module]
    for entry in STATE_ENTRIES:
        if isinstance(obj, dict) and isinstance(obj.get(entry), dict):
            obj = obj[entry]
            break
    if _is_module_level(obj):
        return obj[_pick_module(sorted(obj), module, source)]
    if module is not None:
        raise ValueError(f"{source} holds one state dict, no trained module {module!r}")
    return obj


def read_state_dict(path: str | Path, module: str | None = None) -> dict[str, torch.Tensor]:
    """Any supported checkpoint -> flat state dict with reference key names (weights_only).

    `module` names the trained module of a training checkpoint to read (None: the only one);
    formats that hold a single state dict (`.safetensors`, HF folder) refuse a name."""
    sd = read_raw_state(path, module)
    if any(k.startswith(("embeddings.", "layers.", "pixio.")) for k in sd):
        sd = hf_to_pixio_state(sd)
    return sd


def read_raw_state(path: str | Path, module: str | None = None) -> dict[str, torch.Tensor]:
    """`read_state_dict` without renaming Hugging Face Pixio keys: the file's own names, wrapper
    prefixes (`module.`, `_orig_mod.`) and entries (`model`, `state_dict`) removed. For other
    models' checkpoints (timm baselines)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_dcp_checkpoint(path):
        obj: Any = next(read_module_states(path, [module]))[1]
    elif path.is_dir() or path.suffix == ".safetensors":
        if module is not None:
            raise ValueError(f"{path} holds one state dict, no trained module {module!r}")
        obj = _hf_folder_state(path) if path.is_dir() else load_file(str(path))
    else:
        obj = _pth_state(safe_torch_load(path), module, path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return _strip_wrappers(obj)


def encoder_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only encoder keys (drop the MAE decoder and a distillation student's `last_proj`)."""
    return {k: v for k, v in sd.items() if not k.startswith(NON_ENCODER_PREFIXES)}


def load_encoder_state(encoder: PixioEncoder, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load. A checkpoint of other sizes: StateMismatchError naming the sizes; other
    keys: KeyError listing the missing and unexpected ones; both name the source."""
    expected = encoder.state_dict()
    problem = size_mismatch(expected, sd, source)
    if problem is not None:
        raise StateMismatchError(problem)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{source} does not match the encoder: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    problem = state_mismatch(encoder, sd, source)  # same keys, other shapes (a non-square grid)
    if problem is not None:
        raise StateMismatchError(problem)
    encoder.load_state_dict(sd, strict=True)


def state_mismatch(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> str | None:
    """Why `state` cannot be loaded strictly into `module` (None when it can): the differing
    sizes of a Pixio model or MAE (`architecture.size_mismatch`), else the missing, unexpected and
    mis-shaped keys (a sharded module's parameters report their full shape)."""
    current = module.state_dict()
    sizes = size_mismatch(current, state, source) if isinstance(module, PixioEncoder) else None
    if sizes is not None:  # a Pixio model: its sizes (a baseline's keys are its own)
        return sizes
    expected = {k: tuple(v.shape) for k, v in current.items()}
    problems = {
        "missing keys": sorted(set(expected) - set(state)),
        "unexpected keys": sorted(set(state) - set(expected)),
        "other shapes": [
            k for k in expected if k in state and tuple(state[k].shape) != expected[k]
        ],
    }
    return mismatch_message(source, problems)


def mismatch_message(source: str, problems: dict[str, list[str]]) -> str | None:
    """One line naming (at most 10 of) each kind of problem key of checkpoint `source`; None
    when there is none."""
    found = [
        f"{what} {keys[:10]}{' ...' if len(keys) > 10 else ''}"
        for what, keys in problems.items()
        if keys
    ]
    return f"{source} does not match the encoder: {'; '.join(found)}" if found else None


class StateMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the module it is loaded into."""


def broadcast_checked_state(
    module: torch.nn.Module, read: Callable[[], dict[str, torch.Tensor]], source: str
) -> None:
    """Fill a module already placed on its device (built on the meta device, then `to_empty`,
    or FSDP-sharded) from the full state dict that rank 0 gets from `read()` and checks strictly;
    the other ranks read nothing and receive the weights by broadcast. One read per job and one
    full copy in host memory (a 5B checkpoint is 22 GB; 8 ranks each reading it would hold
    350 GB at start-up). A problem (unreadable file, missing / unexpected / mis-shaped keys)
    raises ValueError on every rank (StateMismatchError for the keys and for other sizes that
    the file records), so none waits for a broadcast that never comes. A training checkpoint is
    verified by that one read, on rank 0."""
    import torch.distributed as dist

    from pixio.runtime.distributed import get_rank, is_dist
    from pixio.runtime.parallel import load_full_state

    state, problem, mismatch = None, None, False
    if get_rank() == 0:
        try:
            state = read()
            problem = state_mismatch(module, state, source)
            mismatch = problem is not None
        except Exception as err:  # any failure must reach the ranks waiting for the broadcast
            problem = _one_line(err, source)
            mismatch = isinstance(err, ArchitectureError)  # other sizes recorded in the file
    if is_dist():
        box = [(problem, mismatch)]
        dist.broadcast_object_list(box, src=0)
        problem, mismatch = box[0]
    if problem is not None:
        raise (StateMismatchError if mismatch else ValueError)(problem)
    load_full_state(module, lambda: state)


def _one_line(err: Exception, source: str) -> str:
    """A reader's error as one line naming the checkpoint (a KeyError without its quotes; an
    OSError with its reason, not its errno)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else safe_error_text(err)
    text = " ".join(text.split()) or type(err).__name__
    return text if source in text else f"{source}: {text}"


def broadcast_encoder_state(
    encoder: torch.nn.Module, path: str | Path, module: str | None = None
) -> None:
    """`broadcast_checked_state` of a Pixio encoder checkpoint `path` (any supported format;
    `module`: the trained module of a training checkpoint). A file that records another
    architecture is refused in one line naming the differing sizes, before its tensors are read."""

    def read() -> dict[str, torch.Tensor]:
        check_architecture(encoder, path, module)
        return encoder_state(read_state_dict(path, module))

    broadcast_checked_state(encoder, read, str(path))


def read_architecture(
    path: str | Path, module: str | None = None, run_config: bool = True
) -> dict[str, Any] | None:
    """The architecture checkpoint `path` records (`pixio.architecture`): a `.safetensors`
    file's metadata (its header only), or, with `run_config`, a training checkpoint directory's
    saved run config (`meta.pt`, verified; `module` as in `read_state_dict`). None for other
    formats and for files written without it. ArchitectureError naming the file for a
    malformed record. Readers that know the model pass `run_config=False`: an encoder read then
    hashes only the files that hold its tensors, whose shapes name any differing size anyway."""
    path = Path(path)
    if is_dcp_checkpoint(path):
        if not run_config:
            return None
        if not (path / META_NAME).is_file():
            return None
        try:
            config = read_meta(path).get("config")
        except CheckpointError as err:  # damaged (a ValueError already) or unreadable
            raise ValueError(str(err)) from None
        return config_architecture(config, module) if isinstance(config, dict) else None
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
    except Exception as err:  # safetensors' own error types: a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({safe_error_text(err)})") from None  # fmt: skip
    return from_metadata(meta, path)


def check_architecture(model: torch.nn.Module, path: str | Path, module: str | None = None) -> None:
    """ArchitectureError naming each size in which built Pixio `model` differs from the
    architecture checkpoint `path` records; nothing when it records none."""
    arch = read_architecture(path, module, run_config=False)
    if arch is not None:
        compare(model_architecture(model), arch, path)


def load_encoder(
    name_or_path: str | Path | None,
    path: str | Path | None = None,
    module: str | None = None,
    **overrides: Any,
) -> PixioEncoder:
    """Build an encoder and load weights from any supported checkpoint format:
    `load_encoder(path)` for a file that records its architecture (every `.safetensors` file
    Pixio writes, a training checkpoint directory), `load_encoder(name, path, **overrides)`
    otherwise (`name` None: the recorded one). A name or size override that disagrees with the
    recorded architecture is refused
    in one line naming the differing sizes (ArchitectureError); `module` picks the trained module
    of a training checkpoint (None: the only one)."""
    if path is None:  # load_encoder(path)
        name_or_path, path = None, name_or_path
    name = None if name_or_path is None else str(name_or_path)
    source = str(path) if module is None else f"{path} (module {module!r})"
    arch = read_architecture(path, module, run_config=name is None)
    name, kwargs = resolve(arch, name, overrides, source)
    encoder = build_encoder(name, **kwargs)
    load_encoder_state(encoder, encoder_state(read_state_dict(path, module)), source)
    return encoder


def checkpoint_digest(path: str | Path) -> str:
    """sha256 identifying a checkpoint: of the file; of a training checkpoint directory's saved
    tensors (`checkpoint_dir.state_digest`: its data files' sha256 as the manifest lists them;
    the read that used them verified them); of a folder's files otherwise (relative names and
    contents, in name order; hidden entries such as `.git` left out)."""
    path, digest = Path(path), hashlib.sha256()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return state_digest(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )  # fmt: skip
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023
                digest.update(block)
    return digest.hexdigest()


def save_state_dict(
    state: dict[str, torch.Tensor], path: str | Path, architecture: dict[str, Any] | None = None
) -> Path:
    """Write a plain state dict as `.safetensors` or `.pth` (format from the extension). A
    `.safetensors` file records `architecture` (`pixio.architecture.model_architecture`) in
    its metadata; a `.pth` file stays a plain state dict (the reference's format)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(
            f"unsupported encoder file extension {path.suffix!r} ({path}): use .safetensors or .pth"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        metadata = {"format": "pt", **(to_metadata(architecture) if architecture else {})}
        save_file(state, str(path), metadata=metadata)
    else:
        torch.save(state, path)
    return path


def save_encoder(encoder: PixioEncoder, path: str | Path, name: str | None = None) -> Path:
    """Save the encoder weights (reference key names; an MAE's decoder is left out) with their
    architecture; `name`: the registry name to record (None: the registry size of the
    encoder's width and heads, if one has them)."""
    arch = model_architecture(encoder, name) | {"kind": "encoder"}
    return save_state_dict(encoder_state(encoder.state_dict()), path, arch)


def save_mae(mae: torch.nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Save the whole pre-training model (encoder + decoder, reference key names) with its
    architecture, decoder sizes included: what `pixio.hub.load_mae` and pre-training's
    `train.init_from` read."""
    return save_state_dict(mae.state_dict(), path, model_architecture(mae, name))
