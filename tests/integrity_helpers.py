"""Helpers of the checkpoint-integrity tests: tiny real training checkpoints written by
`CheckpointManager`, and the damage a failing disk or a bad copy does to them (zeros inside a
tensor's bytes, zeros over a record's header)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from pixio.runtime.checkpointing import CheckpointManager, file_digest
from pixio.safe_load import read_dcp_metadata

ZEROS = 64 << 10  # the span a failing block device returns as zeros


def training_checkpoint(out: Path, modules: dict[str, torch.nn.Module], step: int = 5) -> Path:
    """What the trainer saves for trained modules {name: module}: per module its state and a
    stepped AdamW state, written by CheckpointManager at `step`. Returns the directory."""
    state: dict = {"model": {}, "optimizer": {}}
    for name, module in modules.items():
        opt = torch.optim.AdamW(module.parameters())
        for p in module.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        state["model"][name] = get_model_state_dict(module)
        state["optimizer"][name] = get_optimizer_state_dict(module, opt)
    return CheckpointManager(out).save(step, state, {"iteration": step})


def record(checkpoint: Path, fqn: str) -> tuple[Path, int, int]:
    """(data file, offset, length) of the DCP record that holds entry `fqn`."""
    md = read_dcp_metadata(checkpoint)
    info = next(i for index, i in md.storage_data.items() if index.fqn == fqn)
    return checkpoint / info.relative_path, info.offset, info.length


def zero_bytes(file: Path, start: int, length: int) -> None:
    """Overwrite `length` bytes of `file` at `start` with zeros, in place."""
    raw = bytearray(file.read_bytes())
    assert any(raw[start : start + length]), "the span was zeros already: no damage done"
    raw[start : start + length] = bytes(length)
    file.write_bytes(bytes(raw))


def zero_inside_tensor(checkpoint: Path, fqn: str) -> Path:
    """64 KB of zeros in the middle of entry `fqn`'s record (its tensor bytes; half the record
    when that is smaller), as a failing disk returns them. Returns the damaged file."""
    file, offset, length = record(checkpoint, fqn)
    span = min(ZEROS, length // 2)
    zero_bytes(file, offset + (length - span) // 2, span)
    return file


def zero_record_header(checkpoint: Path, fqn: str) -> Path:
    """Zeros over the first 64 bytes of entry `fqn`'s record (its zip header: torch then reads
    the record as a pickle, opcode 0). Returns the damaged file."""
    file, offset, _ = record(checkpoint, fqn)
    zero_bytes(file, offset, 64)
    return file


def resign(checkpoint: Path) -> None:
    """Rewrite manifest.json to match the files as they are now: damage the manifest cannot
    see (a file written wrong, or an attacker), so that what readers do after it shows."""
    manifest_file = checkpoint / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for name in manifest["files"]:
        manifest["files"][name] = file_digest(checkpoint / name)
    manifest_file.write_text(json.dumps(manifest))


def assert_refusal(message: str, checkpoint: Path, file: str) -> None:
    """One line, naming the checkpoint directory and the damaged file; no advice to turn
    weights_only loading off."""
    assert "\n" not in message.strip(), message
    assert str(checkpoint) in message and file in message, message
    assert "is damaged" in message, message
    assert "weights_only" not in message and "add_safe_globals" not in message, message
