"""The optimiser side of a training iteration: one `Stepper` per optimiser (AdamW or LARS,
schedule, gradient scaler, clipping), precision (autocast), backward with gradient accumulation,
and the optimiser step.

Nothing here reads a device value on the host: the gradient norm stays a device tensor (read
when the trainer logs it), and clipping multiplies the gradients by a device-side coefficient,
min(1, max_norm / (norm + 1e-6)), always, instead of testing `coef < 1` on the host (the formula
and kernels of `torch.nn.utils.clip_grad_norm_`). Under FSDP the norm of sharded gradients is
completed by `full_tensor()`, a collective but no host sync. The one exception is fp16: its
`GradScaler.step` reads `found_inf` on the host to skip a step with overflowed gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pixio.runtime import optim
from pixio.runtime.task import OptimizerSpec, StepOutput


@dataclass
class Stepper:
    """One optimiser with what belongs to it: schedule, gradient scaler, clipping, and the
    module whose parameter names key its checkpointed state."""

    optimizer: torch.optim.Optimizer  # AdamW or LARS (`optim.name`)
    schedule: optim.Schedule
    scaler: torch.amp.GradScaler
    clip_grad: float | None
    root: nn.Module  # the one module it steps, or a ModuleDict of several (state-dict names)
    groups: list[list[nn.Parameter]]  # its parameters, per module (norms are summed over them)
    grad_norm: torch.Tensor | None = None  # pre-clip norm of the last step, on the device


def autocast_dtype(precision: str) -> torch.dtype | None:
    """bf16 / fp16 autocast dtype; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`'s type; nothing for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def no_sync(ddps: Mapping[str, nn.parallel.DistributedDataParallel], skip: bool) -> Any:
    """Skip DDP's gradient all-reduce on accumulation micro-steps (`skip`)."""
    # FSDP keeps syncing: each micro-step reduce-scatters into the sharded gradients, so
    # accumulation never holds an unsharded fp32 gradient (22 GB per GPU at 5B); the price
    # is one reduce-scatter per micro-step instead of one per optimiser step.
    stack = contextlib.ExitStack()
    if skip:
        for ddp in ddps.values():
            stack.enter_context(ddp.no_sync())
    return stack


def build_stepper(
    spec: OptimizerSpec, parts: list[nn.Module], batch: int, t: Any, device: torch.device
) -> Stepper:
    """The `Stepper` of one optimiser spec over its placed trainable modules `parts`; `batch`
    is the samples per step its gradients average over (it scales `blr`)."""
    o = spec.optim
    root = parts[0] if len(parts) == 1 else nn.ModuleDict(dict(zip(spec.modules, parts, strict=True)))  # fmt: skip
    base_lr = optim.resolve_lr(o.lr, o.blr, batch)
    optimizer = optim.optimizer_from_config(root, o, base_lr)
    # A gradient scaler only for fp16: bf16 and fp32 have fp32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    groups = [[p for p in part.parameters() if p.requires_grad] for part in parts]
    schedule = optim.schedule_from_config(o, base_lr, t.epochs)
    return Stepper(optimizer, schedule, scaler, o.clip_grad, root, groups)


def check_owners(specs: Mapping[str, OptimizerSpec], trainable: Mapping[str, Any]) -> None:
    """Every trainable module in exactly one optimiser spec, and only trainable ones."""
    owner: dict[str, str] = {}
    for name, spec in specs.items():
        for module in spec.modules:
            if module not in trainable:
                raise ValueError(f"optimiser {name!r}: {module!r} is not a trainable module")
            if module in owner:
                raise ValueError(f"module {module!r} is in optimisers {owner[module]!r} and {name!r}")  # fmt: skip
            owner[module] = name
    if orphans := sorted(set(trainable) - set(owner)):
        raise ValueError(f"trainable modules in no optimiser: {', '.join(orphans)}")


def backward(out: StepOutput, steppers: Mapping[str, Stepper], accum: int, precision: str) -> None:
    """Backward of the loss / `accum`, each optimiser's loss scaled by its own scaler under
    fp16 (the scalers are identities otherwise)."""
    if out.losses is None:
        if len(steppers) > 1 and precision == "fp16":
            raise ValueError(
                "fp16 with several optimisers needs StepOutput.losses (one per optimiser), "
                "so each gradient scaler scales its own loss"
            )
        total = next(iter(steppers.values())).scaler.scale(out.loss)
    else:
        total = sum(steppers[n].scaler.scale(loss) for n, loss in out.losses.items())
    (total / accum).backward()


def total_grad_norm(groups: list[list[nn.Parameter]], device: torch.device) -> torch.Tensor:
    """L2 norm of all gradients over several modules, a 0-dim fp32 tensor on the device (sharded
    gradients' norms completed over their mesh: a collective, not a host read)."""
    norms = []
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not norms:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(norms)  # sqrt of the sum of squares


def optimizer_step(stepper: Stepper, device: torch.device) -> torch.Tensor:
    """Unscale, clip (when `clip_grad` is set), step, zero grads; returns the pre-clip gradient
    norm as a device tensor."""
    stepper.scaler.unscale_(stepper.optimizer)
    norm = total_grad_norm(stepper.groups, device)
    if stepper.clip_grad is not None:
        # min(1, max_norm / (norm + 1e-6)) times every gradient, one kernel group per device
        params = [p for group in stepper.groups for p in group]
        torch.nn.utils.clip_grads_with_norm_(params, stepper.clip_grad, norm)
    stepper.scaler.step(stepper.optimizer)  # fp16 only: reads found_inf on the host
    stepper.scaler.update()
    stepper.optimizer.zero_grad(set_to_none=True)
    return norm
