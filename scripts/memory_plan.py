"""Per-rank GPU memory plan for Pixio MAE pre-training, measured on a CPU with fake tensors.

    .venv/bin/python scripts/memory_plan.py [--sizes pixio_vit5b16 ...] [--worlds 8 256]
        [--batch 64] [--parallel ddp fsdp] [--ac off on] [--previous] [--jobs 2] [--out FILE]

Prints a markdown table (GiB per rank) to stdout and progress to stderr; the default sweep (five
sizes, DDP + FSDP over 8-256 GPUs, with and without activation checkpointing) is the table of
docs/memory.md. `--previous` adds the previous design's memory for the largest size.

For every (size, DDP/FSDP, world size, activation checkpointing) the model is built the way the
trainer builds it (meta device; FSDP2 through `pixio.runtime.parallel.fully_shard_model`, one
unit per block with bf16 gathered parameters, fp32 root; or DDP with 25 MB fp32 buckets), run
under a fake process group of N ranks and `FakeTensorMode` (no memory is allocated, so a 5B
model over 256 ranks takes seconds), and one real training step (bf16 autocast forward, mask
ratio 0.75 with 4x4 group masking, backward, gradient clipping, fused AdamW) is tracked with
torch's `MemTracker` / `FSDPMemTracker` on rank 0 (the rank that holds the largest shard).
The approach follows torchtitan's scripts/estimate/estimation.py. Next to each measurement the
analytic formula of docs/memory.md is evaluated; the gap between the two is explained there.

Tracking runs on fake *CPU* tensors: FSDP2 creates CUDA streams and events, which need a CUDA
driver even under FakeTensorMode. Autocast therefore runs as `torch.autocast("cpu", bf16)`; for
this model it casts the same tensors as CUDA autocast (docs/memory.md, "Method").
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import pixio
from pixio.models.masking import num_groups
from pixio.runtime.parallel import fully_shard_model, materialize

SIZES = ("pixio_vitb16", "pixio_vitl16", "pixio_vith16", "pixio_vit1b16", "pixio_vit5b16")
WORLDS = (8, 16, 32, 64, 128, 256)
GIB = 2**30
# An H100 80 GB has about 79 GiB of device memory. What FakeTensorMode cannot see (CUDA context
# and cuBLAS/cuDNN workspaces ~1 GiB, NCCL buffers ~1-2 GiB, caching-allocator fragmentation
# ~5%) is kept back: a plan "fits" below FIT_GIB and is "tight" up to the device size.
DEVICE_GIB = 79.0
FIT_GIB = 72.0
IMG_SIZE = 256


@dataclass
class Measured:
    """Per-rank bytes of one tracked training step (rank 0)."""

    params: int  # local parameter storage (fp32; sharded under FSDP, padding included)
    grads: int  # local gradients after backward (+ DDP's fp32 buckets)
    optim: int  # AdamW exp_avg + exp_avg_sq (+ step counters)
    activations: int  # tensors made by forward/backward (and the batch) alive at the fwd/bwd
    # peak; under DDP this includes autocast's bf16 copies of the weights
    gathered: int  # FSDP: unsharded params/grads and collective buffers at that peak
    peak: int  # highest total at any point of the step (optimizer step included)
    seconds: float  # wall time of the measurement


@dataclass
class Analytic:
    """Per-rank bytes predicted by the formula of docs/memory.md."""

    persistent: int  # fp32 params + AdamW (+ DDP buckets): alive the whole step
    grads: int  # fp32 gradients: built during backward, freed after the step
    gathered: int  # FSDP: gathered fp32 root + two bf16 decoder units; DDP: bf16 weight copies
    activations: int  # tensors saved by forward (+ one recomputed block with AC) + the batch
    total: int  # persistent + max(activations + gathered, grads)


@dataclass
class Shape:
    """What the formula needs to know about a model (counted on the meta device)."""

    params: int
    root_params: int  # outside the blocks (FSDP root: stays gathered, fp32)
    root_rows: list[tuple[int, int]]  # (dim 0, elements per dim-0 row) of each root parameter
    dec_unit_params: int  # one decoder block: the units gathered at the peak
    dim: int
    depth: int
    dec_dim: int
    dec_depth: int
    n_cls: int
    patch: int


# ---- building and wrapping ------------------------------------------------------------------
@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    """A fake process group of `world` ranks with this process as rank 0 (collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "a process group is already initialised: run the plan in its own process"
        )
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_meta(name: str, overrides: dict[str, Any], ac: bool) -> pixio.PixioMAE:
    """The MAE on the meta device, as the trainer builds large models."""
    # Built outside FakeTensorMode: the model draws its init seed with `.item()`, which fake
    # tensors cannot answer; meta tensors are converted to fake ones by `to_empty` later.
    with torch.device("meta"):
        mae = pixio.build_mae(name, **overrides)
    mae.set_grad_checkpointing(ac)
    return mae


def shape_of(mae: pixio.PixioMAE) -> Shape:
    """Parameter counts and sizes of a (meta) MAE."""
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    blocks = [*mae.blocks, *mae.decoder_blocks]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in mae.parameters() if id(p) not in in_blocks]
    total = count([mae])
    return Shape(
        params=total,
        root_params=total - count(blocks),
        root_rows=[(p.shape[0], p[0].numel()) for p in root],
        dec_unit_params=count([mae.decoder_blocks[0]]),
        dim=mae.embed_dim,
        depth=len(mae.blocks),
        dec_dim=mae.decoder_embed.out_features,
        dec_depth=len(mae.decoder_blocks),
        n_cls=mae.n_cls_tokens,
        patch=mae.patch_size,
    )


def bucket_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Stand-in for NCCL's in-place all-reduce: the fake group's futures carry no tensor."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


# DDP checks the hook's annotations as objects; postponed annotations are strings.
bucket_hook.__annotations__.update(
    {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
)


def wrap_ddp(mae: nn.Module) -> nn.Module:
    """DDP as the trainer wraps it (default 25 MB fp32 buckets, a second copy of the grads)."""
    # init_sync=False: the start-up broadcast reads tensor data (fake tensors have none) and
    # allocates nothing that stays.
    ddp = nn.parallel.DistributedDataParallel(mae, init_sync=False)
    ddp.register_comm_hook(None, bucket_hook)
    return ddp


# ---- accounting -----------------------------------------------------------------------------
def local_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def optim_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state."""
    return local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def total_of(snapshot: dict[Any, dict[str, int]]) -> int:
    """Total bytes of a MemTracker snapshot, summed over devices."""
    return sum(dev.get("Total", 0) for dev in snapshot.values())


def category(snapshot: dict[Any, dict[str, int]], names: Iterable[str]) -> int:
    """Bytes of the MemTracker categories `names` (their printed labels), over devices."""
    wanted = set(names)
    return sum(
        v for dev in snapshot.values() for k, v in dev.items() if getattr(k, "value", k) in wanted
    )


ACTIVATION_KINDS = ("Activation", "Temp", "Inputs", "Other")  # "Other": the DDP batch
GATHERED_KINDS = ("Unsharded Param", "Unsharded Grad", "All Gather", "Reduce Scatter")


def global_peak_only(tracker_cls: type) -> type:
    """`tracker_cls` keeping only the per-device peak: its per-module peaks cost a loop over
    every tracked module on every op (minutes for a 5B model under DDP), and are not used."""

    class Tracker(tracker_cls):
        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool):
            # a frozen module (the distillation teacher) gets no gradient, and its parameters
            # refuse gradient hooks
            frozen = not any(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(
                module, install_grad_hooks=install_grad_hooks and not frozen
            )

        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return Tracker


# ---- one measured step --------------------------------------------------------------------
def build_adamw(params: list[nn.Parameter], group_size: int = 32) -> torch.optim.AdamW:
    """Fused AdamW, as on the GPU (in place, fp32 exp_avg and exp_avg_sq per parameter).

    The parameters are split into small groups: the kernel and the state are the same, but
    DTensor's sharding propagation grows with the square of a fused op's tensor-list length."""
    groups = [{"params": params[i : i + group_size]} for i in range(0, len(params), group_size)]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)


def warm_optimizer(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> None:
    """Create the AdamW state a running job has (it appears at the first step)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def forward_backward(model: nn.Module, imgs: torch.Tensor, mask_ratio: float) -> None:
    """The trainer's micro-step: bf16 autocast forward, masked pixel loss, backward."""
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU: see the module docstring
        loss = model(imgs, mask_ratio=mask_ratio).loss
    loss.backward()


def optimizer_step(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> None:
    """Clip (the trainer always computes the norm), step, free the gradients."""
    # foreach=False: one norm per tensor; the foreach kernel's per-tensor scalars are the same
    # few bytes, but DTensor dispatch of one op over ~1000 sharded tensors is very slow
    torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=False)
    opt.step()
    opt.zero_grad(set_to_none=True)


@dataclass
class Tracked:
    """What one tracked step saw: the fwd/bwd peak snapshot and per-rank byte counts."""

    fwd_bwd_peak: dict
    grads: int
    buckets: int
    peak: int


def new_tracker(mae: nn.Module, opt: torch.optim.Optimizer, imgs: torch.Tensor, fsdp: bool) -> Any:
    """A tracker that already knows the parameters, the optimizer state and the batch."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if fsdp:
        tracker = global_peak_only(FSDPMemTracker)(mae, opt)
        tracker.track_inputs((imgs,))
    else:
        tracker = global_peak_only(MemTracker)()
        tracker.track_external(mae, opt, imgs)
    return tracker


def tracked_step(
    mae: nn.Module, opt: torch.optim.Optimizer, imgs: torch.Tensor, parallel: str
) -> Tracked:
    """Wrap (DDP) and run one step under a fresh tracker."""
    params = list(mae.parameters())
    tracker = new_tracker(mae, opt, imgs, parallel == "fsdp")
    current = lambda: total_of(tracker.get_tracker_snapshot("current"))  # noqa: E731
    with tracker:
        # DDP is wrapped inside the tracker so that its buckets are counted once, from the start
        before = current()
        model = wrap_ddp(mae) if parallel == "ddp" else mae
        buckets = current() - before
        forward_backward(model, imgs, 0.75)
        fwd_bwd_peak = tracker.get_tracker_snapshot("peak")
        grads = local_bytes(p.grad for p in params)
        optimizer_step(params, opt)
        peak = total_of(tracker.get_tracker_snapshot("peak"))
    return Tracked(fwd_bwd_peak, grads, buckets, peak)


@contextlib.contextmanager
def prepared(
    name: str, parallel: str, world: int, batch: int, ac: bool, overrides: dict[str, Any]
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]]:
    """(model, AdamW with its state, batch) as rank 0 of a fake `world`-rank job holds them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mae = build_meta(name, overrides, ac)
    with fake_world(world), warnings.catch_warnings():
        # MAEOutput.pred is a view (class-token rows dropped); FSDP2 warns about in-place use
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        if parallel == "fsdp":
            fully_shard_model(mae, [*mae.blocks, *mae.decoder_blocks], torch.bfloat16)
        # allow_non_fake_inputs: `to_empty` turns the meta parameters into fake ones.
        with FakeTensorMode(allow_non_fake_inputs=True):
            materialize(mae, torch.device("cpu"), initialize=False)
            params = list(mae.parameters())
            opt = build_adamw(params)
            warm_optimizer(params, opt)
            yield mae, opt, torch.randn(batch, 3, IMG_SIZE, IMG_SIZE)


def measure(
    name: str,
    parallel: str,
    world: int,
    batch: int,
    ac: bool,
    overrides: dict[str, Any] | None = None,
) -> Measured:
    """Track one training step of `name` on rank 0 of a fake `world`-rank job (see module doc)."""
    start = time.perf_counter()
    with prepared(name, parallel, world, batch, ac, overrides or {}) as (mae, opt, imgs):
        t = tracked_step(mae, opt, imgs, parallel)
        return Measured(
            params=local_bytes(mae.parameters()),
            grads=t.grads + t.buckets,
            optim=optim_bytes(opt),
            # the tracker files DDP's buckets (made outside backward) under "Activation"
            activations=category(t.fwd_bwd_peak, ACTIVATION_KINDS) - t.buckets,
            gathered=category(t.fwd_bwd_peak, GATHERED_KINDS),
            peak=t.peak,
            seconds=time.perf_counter() - start,
        )


def accumulation_leftover(name: str, world: int, batch: int, sync: bool) -> int:
    """Bytes an FSDP micro-step leaves alive for the next one (gradient accumulation): sharded
    fp32 grads with gradient sync on (now), unsharded fp32 grads with it off (the old design,
    FSDP2 upcasts unsynced grads to the fp32 reduce dtype)."""
    with prepared(name, "fsdp", world, batch, True, {}) as (mae, opt, imgs):
        tracker = new_tracker(mae, opt, imgs, fsdp=True)
        with tracker:
            before = total_of(tracker.get_tracker_snapshot("current"))
            mae.set_requires_gradient_sync(sync)
            forward_backward(mae, imgs, 0.75)
            return total_of(tracker.get_tracker_snapshot("current")) - before


# ---- distillation: a frozen teacher and several students in one step ------------------------
DISTILL_TEACHER = "pixio_vit5b16"
DISTILL_STUDENTS = ("pixio_vit1b16", "pixio_vith16")


@dataclass
class DistillMeasured:
    """Per-rank bytes of one tracked distillation step (rank 0)."""

    teacher: int  # the teacher's local weights (bf16; sharded or replicated)
    states: int  # every student's fp32 params + AdamW state (+ DDP buckets)
    grads: int  # every student's gradients after backward
    peak: int  # highest total at any point of the step
    parallel: dict[str, str]  # module -> none | ddp | fsdp, as the trainer chooses
    seconds: float


def build_distill_meta(
    teacher: str, students: tuple[str, ...], ac: bool, overrides: dict[str, Any]
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Teacher and students on the meta device, as `distillation.train.build_task` builds them
    (`overrides`: teacher and student size overrides, for tests)."""
    from distillation.model import build_student

    with torch.device("meta"):
        frozen = pixio.build_encoder(teacher, **overrides.get("teacher", {}))
        built = {n: build_student(n, frozen.embed_dim, 4, **overrides.get(n, {})) for n in students}
    for student in built.values():
        student.set_grad_checkpointing(ac)
    return frozen, built


def place_distill(
    teacher: nn.Module, students: dict[str, nn.Module], world: int, parallel: str = "auto"
) -> dict[str, str]:
    """Shard what the trainer shards (before materialising): the frozen teacher in bf16 by its
    size, each student by its parameter count (pixio.runtime.parallel.choose_parallel);
    `parallel` forces a choice (train.parallel; tests)."""
    from pixio.runtime.parallel import choose_parallel, num_params

    teacher.to(torch.bfloat16)  # frozen modules are bf16 on GPUs under bf16 precision
    chosen = {"teacher": choose_parallel(parallel, num_params(teacher), world, False, 2)}
    if chosen["teacher"] == "fsdp":
        fully_shard_model(teacher, teacher.blocks, None)
    for name, student in students.items():
        chosen[name] = choose_parallel(parallel, num_params(student), world)
        if chosen[name] == "fsdp":
            fully_shard_model(student, student.blocks, torch.bfloat16)
    return chosen


def distill_forward_backward(
    teacher: nn.Module, students: dict[str, nn.Module], imgs: torch.Tensor, mask_ratio: float
) -> None:
    """The trainer's distillation micro-step: teacher tokens without gradients, every student
    on its masked view, the summed loss, one backward (as `DistillTask.step`)."""
    from distillation.loss import feature_alignment_loss
    from distillation.model import teacher_tokens

    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU: see the module docstring
        with torch.no_grad():
            target = teacher_tokens(teacher, imgs)  # (B, n_cls + L, D_t)
        losses = []
        for student in students.values():
            tokens, ids_keep = student(imgs, mask_ratio)
            losses.append(feature_alignment_loss(tokens, target, ids_keep, 8)[0])
    sum(losses).backward()


def measure_distill(
    world: int,
    batch: int,
    ac: bool,
    mask_ratio: float = 0.5,
    teacher: str = DISTILL_TEACHER,
    students: tuple[str, ...] = DISTILL_STUDENTS,
    overrides: dict[str, Any] | None = None,
    parallel: str = "auto",
) -> DistillMeasured:
    """Track one distillation step on rank 0 of a fake `world`-rank job."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    start = time.perf_counter()
    frozen, built = build_distill_meta(teacher, students, ac, overrides or {})
    with fake_world(world), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        chosen = place_distill(frozen, built, world, parallel)
        with FakeTensorMode(allow_non_fake_inputs=True):
            materialize(frozen, torch.device("cpu"), initialize=False).requires_grad_(False)
            optimizers = {}
            for name, student in built.items():
                materialize(student, torch.device("cpu"), initialize=False)
                optimizers[name] = build_adamw(list(student.parameters()))
                warm_optimizer(list(student.parameters()), optimizers[name])
            imgs = torch.randn(batch, 3, IMG_SIZE, IMG_SIZE)
            tracker = global_peak_only(MemTracker)()
            tracker.track_external(frozen, *built.values(), *optimizers.values(), imgs)
            with tracker:
                before = total_of(tracker.get_tracker_snapshot("current"))
                wrapped = {n: wrap_ddp(s) if chosen[n] == "ddp" else s for n, s in built.items()}
                buckets = total_of(tracker.get_tracker_snapshot("current")) - before
                distill_forward_backward(frozen, wrapped, imgs, mask_ratio)
                grads = local_bytes(p.grad for s in built.values() for p in s.parameters())
                for name, student in built.items():
                    optimizer_step(list(student.parameters()), optimizers[name])
                peak = total_of(tracker.get_tracker_snapshot("peak"))
            params = local_bytes(p for s in built.values() for p in s.parameters())
            states = params + sum(optim_bytes(o) for o in optimizers.values()) + buckets
            return DistillMeasured(
                local_bytes(frozen.parameters()), states, grads, peak, chosen,
                time.perf_counter() - start,
            )  # fmt: skip


DISTILL_HEADER = (
    "| teacher | students | GPUs | AC | teacher (bf16) | student states | student grads "
    "| **peak** | fits 80 GB |"
)


def distill_rows(worlds: list[int], batch: int, acs: list[bool], jobs: int) -> list[str]:
    """Markdown rows of the distillation sweep (one worker process per configuration)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    configs = [(w, ac) for w in worlds for ac in acs]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_distill_row, configs, [batch] * len(configs)))
    return results


def _distill_row(config: tuple[int, bool], batch: int) -> str:
    world, ac = config
    m = measure_distill(world, batch, ac)
    placed = ", ".join(
        f"{n.removeprefix('pixio_')} {p.upper()}" for n, p in m.parallel.items() if n != "teacher"
    )
    teacher = f"{DISTILL_TEACHER.removeprefix('pixio_')} ({m.parallel['teacher'].replace('none', 'replicated')})"
    cells = [
        teacher, placed, str(world), "on" if ac else "off",
        *(gib(v) for v in (m.teacher, m.states, m.grads)), f"**{gib(m.peak)}**", verdict(m.peak),
    ]  # fmt: skip
    print(f"distill N={world} ac={'on' if ac else 'off'}: peak {gib(m.peak)} GiB in {m.seconds:.1f} s", file=sys.stderr)  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def distill_markdown(rows: list[str], batch: int, seconds: float) -> str:
    lines = [
        f"Distillation, per-rank memory in GiB, batch {batch} per GPU, image {IMG_SIZE}, students "
        "masked at ratio 0.5 (4x4 groups), bf16 autocast, fused AdamW per student; rank 0.",
        "",
        DISTILL_HEADER,
        "|" + "---|" * (DISTILL_HEADER.count("|") - 1),
        *rows,
        "",
        f"Sweep: {len(rows)} configurations in {seconds:.0f} s (torch {torch.__version__}).",
    ]
    return "\n".join(lines) + "\n"


# ---- the formula ----------------------------------------------------------------------------
# Bytes a pre-norm block keeps for backward per token and per unit of width under bf16
# autocast with an fp32 residual stream: fp32 block input (4, LayerNorm 1), bf16 normed input
# (2, qkv), bf16 qkv (6, attention), bf16 attention output (2, proj), fp32 mid-block residual
# (4, LayerNorm 2), bf16 normed (2, fc1), bf16 fc1 output (8, GELU), bf16 GELU output (8, fc2).
BLOCK_BYTES = 4 + 2 + 6 + 2 + 4 + 2 + 8 + 8
AC_BLOCK_BYTES = 4  # with checkpointing a block keeps only its fp32 input


def token_counts(s: Shape, batch: int, mask_ratio: float, mask_grid: int) -> tuple[int, int]:
    """Tokens per rank seen by the encoder (class + visible) and by the decoder (class + all)."""
    side = IMG_SIZE // s.patch
    groups = num_groups(side, side, mask_grid)
    visible = int(groups * (1 - mask_ratio)) * mask_grid**2
    return batch * (s.n_cls + visible), batch * (s.n_cls + side * side)


def activation_bytes(s: Shape, batch: int, ac: bool, mask_ratio: float = 0.75) -> int:
    """Saved activations of forward + the input batch (docs/memory.md, "Formula")."""
    t_enc, t_dec = token_counts(s, batch, mask_ratio, mask_grid=4)
    enc, dec = t_enc * s.dim, t_dec * s.dec_dim
    per_block = AC_BLOCK_BYTES if ac else BLOCK_BYTES
    blocks = per_block * (s.depth * enc + s.dec_depth * dec)
    if ac:
        # backward recomputes one block at a time, the decoder's first; when it reaches the
        # encoder the decoder's checkpoints are gone, which is more than an encoder block needs
        blocks += BLOCK_BYTES * dec
    pixels = batch * 3 * IMG_SIZE**2  # = values predicted: (B, L, 16 * 16 * 3)
    # images fp32 + their bf16 copy (patch conv); the final norms keep an fp32 input and a bf16
    # output (encoder norm -> decoder_embed, decoder_norm -> decoder_pred); the loss keeps the
    # fp32 difference (4 per value) and its backward starts with ~16 bytes per value (expanded
    # grad of the mean, grad of the square, bf16 grad of pred and of the sliced-off rows).
    ends = 6 * pixels + 6 * (enc + dec) + (4 + 16) * pixels
    return blocks + ends


def root_gathered_bytes(s: Shape, world: int) -> int:
    """fp32 bytes of the FSDP root's all-gather output: FSDP2 pads dim 0 of every parameter to a
    multiple of the world size, so a (1, L, D) position table gathers `world` copies of itself."""
    return sum(4 * math.ceil(rows / world) * world * row for rows, row in s.root_rows)


def analytic(s: Shape, parallel: str, world: int, batch: int, ac: bool) -> Analytic:
    """Per-rank peak = persistent + max(activations + gathered, grads) (docs/memory.md)."""
    acts = activation_bytes(s, batch, ac)
    if parallel == "fsdp":
        persistent = math.ceil(12 * s.params / world)  # sharded fp32 param, exp_avg, exp_avg_sq
        grads = math.ceil(4 * s.params / world)
        # the root stays gathered (fp32) from forward to the end of backward; block units are
        # gathered in bf16, the current one and the prefetched next one: at the peak (start of
        # the backward, or in the decoder's backward) these are decoder blocks
        gathered = root_gathered_bytes(s, world) + 2 * 2 * s.dec_unit_params
    else:
        persistent = 16 * s.params  # fp32 param, DDP bucket, exp_avg, exp_avg_sq
        grads = 4 * s.params
        # autocast's bf16 weight copies: its cache holds every one until the forward's autocast
        # context exits (with or without checkpointing); without it backward keeps them too
        gathered = 2 * s.params
    total = persistent + max(acts + gathered, grads)
    return Analytic(persistent, grads, gathered, acts, total)


# ---- the sweep and the table ----------------------------------------------------------------
def configurations(args: argparse.Namespace) -> list[tuple[str, str, int, bool]]:
    """(size, parallel, world, activation checkpointing) to measure, in table order."""
    out = []
    for name in args.sizes:
        for parallel in args.parallel:
            worlds = args.worlds if parallel == "fsdp" else args.worlds[:1]  # DDP: N-independent
            out += [(name, parallel, world, ac) for world in worlds for ac in args.ac]
    return out


def plan_row(config: tuple[str, str, int, bool], batch: int) -> dict[str, Any]:
    """Measure one configuration and evaluate the formula for it (runs in a worker process)."""
    name, parallel, world, ac = config
    with torch.device("meta"):
        shape = shape_of(pixio.build_mae(name))
    m = measure(name, parallel, world, batch, ac)
    a = analytic(shape, parallel, world, batch, ac)
    return dict(model=name, parallel=parallel, world=world, ac=ac, m=m, a=a)


def plan_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration over `args.jobs` processes (each holds its own fake process group),
    progress on stderr as they finish; rows in table order."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    configs = configurations(args)
    rows: dict[int, dict[str, Any]] = {}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(plan_row, c, args.batch): i for i, c in enumerate(configs)}
        for done in as_completed(futures):
            rows[futures[done]] = done.result()
            print(
                f"[{len(rows)}/{len(configs)}] {progress_line(rows[futures[done]])}",
                file=sys.stderr,
            )
    return [rows[i] for i in range(len(configs))]


def gib(n: int) -> str:
    """Bytes as GiB: two decimals, three below 0.1 GiB (sharded states at 256 ranks)."""
    value = n / GIB
    return f"{value:.2f}" if value >= 0.1 or value == 0 else f"{value:.3f}"


def verdict(peak: int) -> str:
    """Whether a per-rank peak fits an 80 GB H100 with the headroom of FIT_GIB."""
    if peak <= FIT_GIB * GIB:
        return "yes"
    return "tight" if peak <= DEVICE_GIB * GIB else "no"


def progress_line(row: dict[str, Any]) -> str:
    m, a = row["m"], row["a"]
    return (
        f"{row['model']} {row['parallel']} N={row['world']} ac={'on' if row['ac'] else 'off'}: "
        f"peak {gib(m.peak)} GiB (analytic {gib(a.total)}) in {m.seconds:.1f} s"
    )


HEADER = (
    "| model | parallel | GPUs | AC | params | grads | AdamW | activations | gathered "
    "| **peak** | analytic | gap | fits 80 GB |"
)


def markdown_row(row: dict[str, Any]) -> str:
    m, a = row["m"], row["a"]
    ddp = row["parallel"] == "ddp"
    cells = [
        row["model"].removeprefix("pixio_"),
        row["parallel"].upper(),
        "any" if ddp else str(row["world"]),  # DDP memory does not depend on the GPU count
        "on" if row["ac"] else "off",
        *(gib(v) for v in (m.params, m.grads, m.optim, m.activations)),
        "-" if ddp else gib(m.gathered),
        f"**{gib(m.peak)}**",
        gib(a.total),
        f"{(m.peak - a.total) / a.total * 100:+.1f}%",
        verdict(m.peak),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(rows: list[dict[str, Any]], batch: int, seconds: float, jobs: int) -> str:
    """The table (GiB per rank) with its caption and how long the sweep took."""
    lines = [
        f"Per-rank memory in GiB, batch {batch} per GPU, image {IMG_SIZE}, mask ratio 0.75 "
        "(4x4 groups), 8 class tokens, bf16 autocast, fused AdamW; measured on rank 0.",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
        *(markdown_row(r) for r in rows),
        "",
        f"Sweep: {len(rows)} configurations in {seconds:.0f} s ({jobs} worker processes, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}).",
    ]
    return "\n".join(lines) + "\n"


def previous_design(name: str, world: int, batch: int) -> str:
    """Memory of the previous design next to now, for `name` over `world` ranks."""
    with torch.device("meta"):
        mae = pixio.build_mae(name)
    full = 4 * sum(p.numel() for p in mae.parameters())  # fp32 model on every rank's CPU
    largest = 4 * max(p.numel() for p in mae.parameters())  # init: one full parameter at a time
    print(f"{name}: gradient accumulation, sync off / on ...", file=sys.stderr, flush=True)
    unsynced = accumulation_leftover(name, world, batch, sync=False)
    synced = accumulation_leftover(name, world, batch, sync=True)
    rows = [
        f"| {name.removeprefix('pixio_')}, {world} GPUs | previous design | now |",
        "|---|---|---|",
        f"| host RAM to build the model, per rank | {gib(full)} GiB (full fp32 model) "
        f"| {gib(largest)} GiB (meta build; init holds one full parameter at a time) |",
        f"| same, per 8-GPU node | {gib(8 * full)} GiB | {gib(8 * largest)} GiB |",
        f"| GPU memory when the model arrives, per rank | {gib(full)} GiB (full model moved, "
        f"then sharded) | {gib(full // world)} GiB (local shard only) |",
        f"| gradients kept between accumulation micro-steps (measured) "
        f"| {gib(unsynced)} GiB (sync off: unsharded fp32) | {gib(synced)} GiB (sync on: sharded) |",
    ]
    return "\n".join(rows) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=pixio.list_models())
    p.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS))
    p.add_argument("--batch", type=int, default=64, help="images per GPU")
    p.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--ac", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument(
        "--previous", action="store_true", help="add the previous design's memory (largest size)"
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one CPU core each)")
    p.add_argument("--out", type=Path, default=None, help="also write the output here")
    p.add_argument(
        "--distill",
        action="store_true",
        help="the distillation plan instead (teacher 5B, students 1B + H; --worlds, --batch, --ac)",
    )
    args = p.parse_args(argv)
    args.ac = [a == "on" for a in args.ac]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.distill:
        rows = distill_rows(args.worlds, args.batch, args.ac, args.jobs)
        text = distill_markdown(rows, args.batch, time.perf_counter() - start)
        print(text, end="")
        if args.out is not None:
            args.out.write_text(text)
        return
    rows = plan_rows(args)
    text = markdown(rows, args.batch, time.perf_counter() - start, args.jobs)
    if args.previous:
        text += "\n" + previous_design(args.sizes[-1], max(args.worlds), args.batch)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
