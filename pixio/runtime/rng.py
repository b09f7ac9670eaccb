"""Every random generator a training rank draws from, captured into a checkpoint's `meta` and
restored on resume (same world size: each rank continues its own streams).

On GPUs only the rank's own CUDA device is read and written: `torch.cuda.get_rng_state_all()`
would initialise a CUDA context on every GPU of the node from every rank: 64 contexts on an
8-GPU node, 56 of them on GPUs their rank never uses, each a few hundred MB of device memory.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and this rank's CUDA device's generator states (`cuda_device`;
    no other GPU is touched, none at all when this process never initialised CUDA), as
    tensors/ints/lists only, so the result survives `weights_only=True` loading."""
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
    if _cuda_in_use():
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`, on this rank's CUDA device only. Checkpoints written
    before `cuda_device` hold every device of the node (`cuda`, a list): the entry of this
    rank's device is restored."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if not _cuda_in_use():
        return
    device = torch.cuda.current_device()
    own, every = state.get("cuda_device"), state.get("cuda") or []
    if own is None and device < len(every):
        own = every[device]
    if own is not None:
        torch.cuda.set_rng_state(own.cpu(), device)


def _cuda_in_use() -> bool:
    """CUDA is initialised in this process (a GPU run): asking otherwise would create a context."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()
