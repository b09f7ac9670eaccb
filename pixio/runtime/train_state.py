"""What a training checkpoint holds besides its meta data, and how a resume puts it back: this
rank's shards of every trainable module and optimiser (by name), the gradient scalers, and each
rank's random and data streams."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pixio.runtime import checkpointing
from pixio.runtime.step import Stepper

log = logging.getLogger("pixio.train")


def app_state(
    trainable: Mapping[str, nn.Module], steppers: Mapping[str, Stepper]
) -> dict[str, Any]:
    """What DCP saves and loads in place: this rank's shards of every trainable module and
    optimiser, by name. Frozen modules are not saved: the job rebuilds them."""
    return {
        "model": {n: get_model_state_dict(m) for n, m in trainable.items()},
        "optimizer": {
            n: get_optimizer_state_dict(s.root, s.optimizer) for n, s in steppers.items()
        },
    }


def load_app_state(
    state: dict[str, Any],
    meta: Mapping[str, Any],
    trainable: Mapping[str, nn.Module],
    steppers: Mapping[str, Stepper],
) -> None:
    """Put a loaded `app_state` and the checkpoint's gradient scalers back in place."""
    for name, module in trainable.items():
        set_model_state_dict(module, state["model"][name])
    for name, stepper in steppers.items():
        set_optimizer_state_dict(stepper.root, stepper.optimizer, state["optimizer"][name])
        if saved := (meta.get("scalers") or {}).get(name):
            stepper.scaler.load_state_dict(saved)


def restore_streams(meta: Mapping[str, Any], rank: int, world_size: int, data: Any) -> None:
    """Same world size: every rank continues its own RNG and data streams. Otherwise the
    streams start afresh (the loader logs that); weights and optimiser are resharded."""
    if meta.get("world_size") != world_size:
        log.warning(
            "checkpoint written by %s processes, resuming with %d: fresh random streams "
            "(training continues, but not bit-identically)",
            meta.get("world_size"), world_size,
        )  # fmt: skip
    elif meta.get("rng"):
        checkpointing.restore_rng_state(meta["rng"][rank])
    # The loader compares the saved layout with its own and says what changed, if anything.
    data_states = meta.get("data") or []
    load = getattr(data, "load_state_dict", None)
    if callable(load) and len(data_states) > rank and data_states[rank]:
        load(data_states[rank])


def merged(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict of every rank's entries (the first rank's value for a name several hold)."""
    out: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            out.setdefault(key, value)
    return out
