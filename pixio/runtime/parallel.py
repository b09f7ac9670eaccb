"""Parallelism shared by every job: the DDP / FSDP2 choice, sharding, meta-device materialisation.

One precision policy for every path, so DDP (ViT-H) and FSDP (1B, 5B) optimise the same objective:
- the inputs reach the model in fp32 (FSDP's input cast is off), so the norm-pix targets are
  computed from fp32 images on every path;
- matrix products run in bf16 under autocast on every path; under FSDP the blocks' parameters are
  gathered in bf16 (what autocast would cast them to anyway), the root's few parameters (patch
  embedding, position tables, tokens, final norms, decoder projections) stay fp32;
- the residual stream is fp32 on every path (fp32 + bf16 branch outputs), LayerNorm and softmax
  statistics run in fp32 (autocast), gradients are reduced in fp32.

Large models are built on the meta device, sharded, then materialised: each rank allocates only its
shard and fills it with `pixio.models.init.init_parameters`, which gives exactly the weights a
single-process build with the same seed has.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from pixio.models.init import init_parameters
from pixio.runtime.choices import PARALLEL_CHOICES

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger("pixio.parallel")

# Trainable modules of at least this many parameters default to FSDP: fp32 weights, gradients and
# AdamW's two moments take 16 bytes per parameter (16 GB at 1B, 87 GB at 5B), which DDP would
# replicate on every GPU. ViT-H's MAE (0.73B) stays under DDP, the 1B and 5B ones are sharded.
FSDP_MIN_PARAMS = 1_000_000_000
# Frozen modules hold only weights: replicated while they take at most this much per GPU (a 1B
# encoder is 2.7 GB in bf16), sharded above it (the 5B teacher: 10.9 GB in bf16).
FROZEN_REPLICATE_MAX_BYTES = 4 * 2**30


def num_params(module: nn.Module) -> int:
    """Parameter count (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def choose_parallel(
    parallel: str, numel: int, world_size: int, trainable: bool = True, param_bytes: int = 4
) -> str:
    """Resolve `auto` for one module of `numel` parameters: single process -> none; trainable:
    fsdp from FSDP_MIN_PARAMS, ddp below; frozen: fsdp when its weights (`param_bytes` each)
    exceed FROZEN_REPLICATE_MAX_BYTES, else none (replicated). An explicit choice is kept when
    a process group exists, also one of a single rank (`torchrun --nproc_per_node=1`: the FSDP
    path checked on one GPU); a frozen module is never wrapped in DDP (no gradients)."""
    if parallel not in PARALLEL_CHOICES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_CHOICES)}, got {parallel!r}")
    if world_size == 1 and (parallel == "auto" or not _has_process_group()):
        return "none"  # nothing to replicate or shard
    if not trainable:
        if parallel == "auto":
            return "fsdp" if numel * param_bytes > FROZEN_REPLICATE_MAX_BYTES else "none"
        return "none" if parallel == "ddp" else parallel
    if parallel != "auto":
        return parallel
    return "fsdp" if numel >= FSDP_MIN_PARAMS else "ddp"


def _has_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside the wrappers the trainer may put around it, in any order and number:
    torch.compile's `OptimizedModule` (`_orig_mod`) and DDP (`module`); FSDP2 wraps nothing
    (it changes the module's class in place). Code that calls a module on some ranks only (a
    validation over uneven shards, a bare head) must call the unwrapped one: a compiled DDP
    module still runs DDP's forward, whose buffer broadcast is a collective."""
    # No OptimizedModule exists before torch.compile's module is imported: do not import it.
    frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = frame.OptimizedModule if frame is not None else ()
    while True:
        if isinstance(module, compiled):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def fully_shard_model(
    model: nn.Module,
    units: Sequence[nn.Module],
    param_dtype: torch.dtype | None,
    mesh: DeviceMesh | None = None,
    forward_methods: Sequence[str] = (),
) -> nn.Module:
    """FSDP2: one unit per block (`units`, parameters gathered in `param_dtype`), then the root
    (parameters kept in their dtype); gradients reduced in fp32; inputs never cast (see module
    doc). `mesh`: shard over a subgroup (default: all ranks). `forward_methods`: methods other
    than forward() that callers use, so they gather the root's parameters too."""
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    blocks = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    root = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=blocks)
    fully_shard(model, mesh=mesh, mp_policy=root, shard_placement_fn=_shard_wide_dim)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def _shard_wide_dim(param: nn.Parameter):
    """Shard (1, n, D) tables (position tables, class and mask tokens) on D, not on their
    length-1 first dimension: dim-0 sharding would pad each to one row per rank (256 rows at
    256 GPUs; 0.95 GiB per GPU for 5B, measured by scripts/memory_plan.py)."""
    from torch.distributed.tensor import Shard

    return Shard(param.ndim - 1) if param.ndim > 1 and param.shape[0] == 1 else None


def frozen_block_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype of a frozen module's blocks: bf16 on GPUs under bf16 precision (half the
    memory; autocast computes their matmuls in bf16 anyway, LayerNorm in fp32), fp32 elsewhere.
    The root's small tables stay fp32, so the residual stream is fp32 on every path."""
    return torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32


def cast_blocks(units: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """Cast the blocks of a frozen module to `dtype` where they are (on the CPU or the meta
    device: before they reach the GPU, never as an fp32 copy there first); fp32 is a no-op."""
    if dtype != torch.float32:
        for unit in units:
            unit.to(dtype)


def has_meta(model: nn.Module) -> bool:
    """True when any parameter or buffer still lives on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def materialize(model: nn.Module, device: torch.device, initialize: bool = True) -> nn.Module:
    """Allocate a meta-built (possibly sharded) model on `device` and initialise it from its
    `init_seed`; a model that is already materialised is only moved. `initialize=False` skips
    the initialisation (a checkpoint overwrites every value anyway)."""
    if not has_meta(model):
        return model.to(device)
    if any(b.is_meta for b in model.buffers()):
        raise ValueError("meta-built models with buffers are not supported: build it on a device")
    model.to_empty(device=device)
    if initialize:
        seed = getattr(model, "init_seed", None)
        if seed is None:
            raise ValueError(f"{type(model).__name__} has no init_seed: cannot initialise it")
        init_parameters(model, seed)
    return model


def load_full_state(module: nn.Module, read: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Fill a placed module (replicated, DDP-wrapped or FSDP-sharded) from a full state dict
    that only rank 0 reads (`read()`) and broadcasts: one read of the file per job, not one
    per rank (a 5B teacher is 22 GB in fp32; 256 ranks reading it would move 5.6 TB). Strict:
    a missing, unexpected or mis-shaped key is an error. Device memory: one tensor at a time
    beyond the module's own (never the full state). For `ModuleSpec.load`."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    grouped = dist.is_available() and dist.is_initialized()
    if grouped and any(isinstance(p, DTensor) for p in module.parameters()):
        # Sharded: torch broadcasts one full tensor at a time and copies its slice.
        state = read() if dist.get_rank() == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        set_model_state_dict(module, state, options=options)
    elif grouped and dist.get_world_size() > 1:
        _broadcast_replicated(unwrap(module), read)
    else:
        unwrap(module).load_state_dict(read(), strict=True)


def _broadcast_replicated(module: nn.Module, read: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Rank 0's full state into every rank's replica, tensor by tensor, each cast to its
    parameter's dtype before it leaves rank 0 (bf16 blocks travel as bf16), and dropped from
    `read()`'s dict once sent (rank 0's host copy shrinks as it goes). torch's
    broadcast_from_rank0 would hold every full tensor on the device until the end (a 5B
    encoder's 21.8 GB of fp32 beside its 10.9 GB of bf16 weights)."""
    import torch.distributed as dist

    from pixio.checkpoint import state_mismatch  # the one strictness check (lazy: it imports us)
    from pixio.runtime.distributed import reduce_device

    targets = module.state_dict()  # name -> tensor sharing the module's storage
    state, problem, failure = {}, None, None
    if dist.get_rank() == 0:
        try:
            state = read()
            problem = state_mismatch(module, state, "the broadcast state")
        except Exception as err:  # the other ranks must not wait for a broadcast
            failure, problem = err, f"rank 0 could not read the state: {err}"
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise ValueError(box[0])
    wire = reduce_device()
    for name, target in targets.items():  # the same order on every rank
        if dist.get_rank() == 0:
            piece = state.pop(name).to(wire, target.dtype)
        else:
            piece = torch.empty(target.shape, dtype=target.dtype, device=wire)
        dist.broadcast(piece, src=0)
        target.copy_(piece)
