"""Encoder checkpoint formats: read any supported file safely, load into an encoder, save.

Supported inputs of `load_encoder`: a reference encoder `.pth` (plain state dict); a training
checkpoint with a `'model'` entry (pre-training: decoder dropped; distillation student:
`last_proj` dropped), either a single `.pth` file or a training checkpoint directory
(`torch.distributed.checkpoint`, e.g. `output_dir/checkpoint-last`), from which only the model
tensors are read (never the optimiser state); a `.safetensors` file; a Hugging Face Pixio folder.
Nothing is unpickled except through `weights_only=True` or the restricted DCP metadata reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pixio.hf import hf_to_pixio_state
from pixio.models.encoder import PixioEncoder
from pixio.models.registry import build_encoder
from pixio.safe_load import (
    METADATA_NAME,
    UnsafeCheckpointError,
    dcp_key_paths,
    load_dcp_entries,
    read_dcp_metadata,
    safe_torch_load,
)

__all__ = [
    "UnsafeCheckpointError",
    "encoder_state",
    "is_dcp_checkpoint",
    "load_encoder",
    "load_encoder_state",
    "read_state_dict",
    "safe_torch_load",
    "save_encoder",
    "save_state_dict",
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


def _dcp_model_state(path: Path) -> dict[str, Any]:
    """The model entry of a DCP training checkpoint, reading only its tensors: the first of
    STATE_ENTRIES present (else every tensor), keys without that prefix."""
    md = read_dcp_metadata(path)
    tensors = {
        k: p
        for k, p in dcp_key_paths(md).items()
        if isinstance(md.state_dict_metadata[k], TensorStorageMetadata)
    }
    entry = next((e for e in STATE_ENTRIES if any(p[0] == e for p in tensors.values())), None)
    chosen = {k: p for k, p in tensors.items() if entry is None or (p[0] == entry and len(p) > 1)}
    skip = 0 if entry is None else 1  # drop the entry name from the nested path
    flat = load_dcp_entries(path, chosen, md)
    return {".".join(map(str, chosen[k][skip:])): v for k, v in flat.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Any supported checkpoint -> flat state dict with reference key names (weights_only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_dcp_checkpoint(path):
        obj: Any = {"model": _dcp_model_state(path)}
    elif path.is_dir():
        obj = _hf_folder_state(path)
    elif path.suffix == ".safetensors":
        obj = load_file(str(path))
    else:
        obj = safe_torch_load(path)
    for entry in STATE_ENTRIES:
        if isinstance(obj, dict) and isinstance(obj.get(entry), dict):
            obj = obj[entry]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = _strip_wrappers(obj)
    if any(k.startswith(("embeddings.", "layers.", "pixio.")) for k in sd):
        sd = hf_to_pixio_state(sd)
    return sd


def encoder_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only encoder keys (drop the MAE decoder and a distillation student's `last_proj`)."""
    return {k: v for k, v in sd.items() if not k.startswith(NON_ENCODER_PREFIXES)}


def load_encoder_state(encoder: PixioEncoder, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load; an error that lists missing and unexpected keys, naming the source."""
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(
            f"{source} does not match the encoder: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}"
        )
    encoder.load_state_dict(sd, strict=True)


def load_encoder(name: str, path: str | Path, **overrides: Any) -> PixioEncoder:
    """Build encoder `name` and load weights from any supported checkpoint format."""
    encoder = build_encoder(name, **overrides)
    load_encoder_state(encoder, encoder_state(read_state_dict(path)), str(path))
    return encoder


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a plain state dict as `.safetensors` or `.pth` (format from the extension)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(
            f"unsupported encoder file extension {path.suffix!r} ({path}): use .safetensors or .pth"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def save_encoder(encoder: PixioEncoder, path: str | Path) -> Path:
    """Save the encoder weights (reference key names; an MAE's decoder is left out)."""
    return save_state_dict(encoder_state(encoder.state_dict()), path)
