"""torch.compile for training: each repeated block compiled on its own, the wrappers left eager.

What is compiled is every unit a task lists in `ModuleSpec.shard_units` (the transformer blocks),
never the wrapped root:
- FSDP2 all-gathers a block's weights in a forward pre-hook and frees them in a post-hook, and
  DDP's gradient hooks sit on the parameters. Only each block's `forward` is replaced, so
  `nn.Module.__call__` still runs those hooks eagerly around the compiled graph: the collectives
  and FSDP's prefetching stay outside the graphs, and the state-dict names stay unchanged (no
  `_orig_mod.` prefix). The replacement is an instance attribute, so compiling before or after
  `fully_shard` / DDP gives the same graphs.
- Blocks of one stack share their code, and dynamo caches graphs per code object with the
  parameters as inputs, so a stack compiles one graph whatever its depth (the drop-path rate is
  a tensor for that reason: `pixio.models.encoder.DropPath`). `dynamic=False`: the encoder's
  and the decoder's blocks (other shapes, the same code) get one static graph each, rather
  than a second graph with symbolic sizes.
- Only the training step takes the compiled path. Evaluation (pictures, validation, periodic
  monitors) runs in eval mode without gradients, which are guards: calling the graph there
  would compile more graphs (and spend the recompile limit, 8 per code object, shared by every
  block); those calls run the eager forward instead. A trainable block is compiled when it
  runs with gradients in training mode; a frozen block (a teacher, an evaluation encoder)
  whenever the job is in its training step (`training()`: its trainable modules are in
  training mode; the trainer's evaluation context switches them to eval).

`train.compile`: `auto` (on for CUDA runs), `true`, `false`. See docs/performance.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pixio.runtime.choices import COMPILE_CHOICES

log = logging.getLogger("pixio.compile")

BACKEND = "inductor"  # tests switch to "aot_eager" where only the graph counts matter


def compile_enabled(setting: Any, device: torch.device) -> bool:
    """`train.compile` resolved: True / False (or "true" / "false"), or "auto" (or None): on
    for CUDA devices. ValueError for anything else."""
    text = str(setting).lower() if setting is not None else "auto"
    if text not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {setting!r}")
    return device.type == "cuda" if text == "auto" else text == "true"


def compile_units(
    units: Sequence[nn.Module],
    active: Callable[[nn.Module], bool],
    backend: str | None = None,
) -> int:
    """Replace each unit's `forward` by one that runs a compiled copy when `active(unit)` and
    the eager forward otherwise. Returns the number of units compiled (a unit compiled before
    is left as it is)."""
    done = 0
    for unit in units:
        if isinstance(unit.__dict__.get("forward"), _Dispatch):
            continue
        eager = unit.forward  # bound method of the class's forward
        compiled = torch.compile(eager, backend=backend or BACKEND, dynamic=False)
        unit.forward = _Dispatch(unit, eager, compiled, active)
        done += 1
    return done


class _Dispatch:
    """A unit's forward: the compiled one on the training path, the eager one elsewhere."""

    def __init__(
        self,
        unit: nn.Module,
        eager: Callable[..., Any],
        compiled: Callable[..., Any],
        active: Callable[[nn.Module], bool],
    ) -> None:
        self.unit, self.eager, self.compiled, self.active = unit, eager, compiled, active

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run = self.compiled if self.active(self.unit) else self.eager
        return run(*args, **kwargs)


def training_path(unit: nn.Module) -> bool:
    """A trainable unit's compiled path: gradients on and training mode (the training step)."""
    return torch.is_grad_enabled() and unit.training


def frozen_path(training: Callable[[], bool]) -> Callable[[nn.Module], bool]:
    """A frozen unit's compiled path: whenever `training()` says the job is in its step."""
    return lambda unit: training()


def compile_for_training(
    name: str,
    module: nn.Module,
    units: Sequence[nn.Module],
    trainable: bool,
    trainable_modules: Mapping[str, nn.Module],
) -> nn.Module:
    """The trainer's compile step for one placed module: compile its `units` (trainable: on
    the training path; frozen: while `trainable_modules` train) and return `module` unchanged
    (the root and its wrappers stay eager). A module without units is left eager."""
    if trainable:
        active = training_path
    else:
        active = frozen_path(lambda: any(m.training for m in trainable_modules.values()))
    count = compile_units(units, active)
    if count:
        log.info("compile: %s: %d blocks, each compiled apart (backend %s)", name, count, BACKEND)
    else:
        log.info("compile: %s has no blocks (ModuleSpec.shard_units): it runs eagerly", name)
    return module
