"""What scripts/gpu_check.py's stages share: the per-mode plans (`PLANS`), the stage context,
timing and job helpers, and the MAE benchmark (also run by scripts/bench_mae.py).

`PLANS` holds the sizes: the GPU's (ViT-H/16 at batch 64, the demos as they ship, shorter
schedules) and the CPU mode's (tiny models, a few iterations). No torch at import: the driver
imports this module, and each stage imports torch in its own process.
"""

from __future__ import annotations

import collections
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MASK_RATIO = 0.75


@dataclass(frozen=True)
class Plan:
    """What each stage runs, per mode."""

    mae: dict[str, Any]  # build_mae arguments of the MAE benchmark
    batch: int  # its batch
    warmup: int  # untimed steps after the first
    steps: int  # timed steps (the median is reported)
    fsdp_mae: dict[str, Any]  # build_mae arguments of the FSDP2 stage
    fsdp_batch: int
    compile: bool  # compile in the FSDP2 and trainer stages (CPU: inductor's C++ build is slow)
    bf16: bool  # bf16 autocast over fp32 weights, as training runs (CPU: fp32, bf16 is emulated)
    demo_data: dict[str, int] | None  # None: the shipped demo set; else a small one (samples, ...)
    demo_encoder: dict[str, int]  # img_size and depth of the pre-training demo's encoder
    pretrain: list[str]  # overrides of experiment=demo (shorter schedule; CPU: tiny model)
    stop_at: int  # train.max_iters of the stopped run
    eval_extra: list[str]  # overrides of the depth and segmentation demos
    knn_extra: list[str]
    distill: list[str]
    jpeg: tuple[int, int, int]  # images, height, width
    tolerance: float  # resumed vs uninterrupted: max |loss| and |weight| difference
    threads: int | None  # torch CPU threads of the in-process stages (None: torch's default)


TINY_MAE = dict(name="pixio_vitt16", depth=2, img_size=128, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)  # fmt: skip
PLANS = {
    "cuda": Plan(
        mae=dict(name="pixio_vith16"), batch=64, warmup=3, steps=10,
        fsdp_mae=dict(name="pixio_vitb16", depth=4, decoder_depth=4), fsdp_batch=32, compile=True, bf16=True,
        demo_data=None, demo_encoder=dict(img_size=128, depth=6),
        pretrain=["train.iters_per_epoch=50", "train.epochs=2", "train.save_every_iters=50", "train.log_every=10", "train.vis_every=50"],  # fmt: skip
        stop_at=60, eval_extra=[], knn_extra=[],
        distill=["train.epochs=2", "train.log_every=10"],
        jpeg=(128, 384, 512), tolerance=1e-4, threads=None,
    ),
    "cpu": Plan(
        mae=TINY_MAE, batch=4, warmup=1, steps=3,
        fsdp_mae=dict(TINY_MAE, img_size=64, decoder_depth=1), fsdp_batch=4, compile=False, bf16=False,
        demo_data=dict(samples=48, shard_size=12), demo_encoder=dict(img_size=64, depth=4),
        pretrain=["model.depth=4", "model.img_size=64", "model.mask_grid=2", "model.decoder_depth=1", "train.batch_size=4", "train.iters_per_epoch=3", "train.epochs=2", "train.save_every_iters=3", "train.log_every=1", "train.vis_every=3", "data.num_workers=0"],  # fmt: skip
        stop_at=4,
        eval_extra=["data.crop_size=64", "eval.window=64", "eval.stride=64", "train.epochs=1", "data.demo_train=4", "data.demo_val=1", "eval.vis_images=1"],  # fmt: skip
        knn_extra=["data.resize=64", "data.crop=64"],
        distill=["img_size=64", "mask_grid=2", "train.batch_size=4", "train.iters_per_epoch=3", "train.epochs=1", "train.save_every_iters=3", "train.log_every=1", "train.vis_every=3", "data.num_workers=0"],  # fmt: skip
        jpeg=(16, 192, 256), tolerance=1e-4,
        threads=1,  # several threads on a shared machine's busy cores wait on each other
    ),
}  # fmt: skip


@dataclass
class Ctx:
    device: str  # "cuda" or "cpu"
    out: Path  # the check's output folder
    plan: Plan

    def autocast(self) -> Any:
        """bf16 autocast (the trainer's default precision) or, in fp32 plans, nothing."""
        import contextlib

        import torch

        if not self.plan.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16)

    def dir(self, name: str) -> Path:
        """A fresh folder for `name` under the output folder (a re-run starts clean)."""
        path = self.out / name
        shutil.rmtree(path, ignore_errors=True)
        return path


# ---- helpers ---------------------------------------------------------------------------------
def job(module: str, overrides: list[str], timeout: float = 600) -> float:
    """Run `python -m module overrides` in the repo, its output into ours (the log); seconds.
    RuntimeError with the job's last line when it fails."""
    cmd = [sys.executable, "-m", module, *overrides]
    print(f"$ {' '.join(cmd)}", flush=True)
    start, tail = time.perf_counter(), collections.deque(maxlen=5)
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:  # fmt: skip
        for line in p.stdout:  # type: ignore[union-attr]
            sys.stdout.write(line)
            tail.append(line.strip())
        code = p.wait(timeout=timeout)
    if code != 0:
        last = next((t for t in reversed(tail) if t), "")
        raise RuntimeError(f"{module} exited with {code}: {last}")
    return round(time.perf_counter() - start, 1)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], Any], n: int, device: str) -> list[float]:
    """Milliseconds of each of `n` calls: CUDA events on the GPU (device time, launch gaps
    included), wall clock on the CPU."""
    import torch

    if device != "cuda":
        out = []
        for _ in range(n):
            t = time.perf_counter()
            step()
            out.append((time.perf_counter() - t) * 1e3)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]  # fmt: skip
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def spread(ms: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(ms), 3), "min": round(min(ms), 3), "max": round(max(ms), 3)}  # fmt: skip


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def metrics_by_step(output_dir: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl of a run (a resumed run's rewound file), by step."""
    rows = [json.loads(ln) for ln in (output_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]  # fmt: skip
    return {r["step"]: r for r in rows if "loss" in r}


# ---- the MAE benchmark -----------------------------------------------------------------------
def kernel_count(step: Callable[[], Any], device: str) -> dict[str, int]:
    """Events of one profiled step: GPU kernels (memcpy / memset included) and CPU-side events
    (operators and CUDA runtime calls)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    events = prof.events()
    counts = {"cpu_events": sum(1 for e in events if e.device_type == DeviceType.CPU)}
    if device == "cuda":
        counts["gpu_kernels"] = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return counts


def forward_split(model: Any, x: Any, ctx: Ctx) -> dict[str, Any]:
    """Median forward ms of the encoder (visible tokens) and of the decoder (all tokens), eager,
    without gradients."""
    import torch

    enc, dec = [], []
    with torch.no_grad(), ctx.autocast():
        for i in range(ctx.plan.warmup + ctx.plan.steps):
            state: dict[str, Any] = {}

            def encode(state: dict[str, Any] = state) -> None:
                state["enc"] = model.forward_encoder(x, MASK_RATIO, None)

            def decode(state: dict[str, Any] = state) -> None:
                latent, _, ids_restore, grid = state["enc"]
                model.forward_decoder(latent, ids_restore, grid)

            e, d = time_steps(encode, 1, ctx.device), time_steps(decode, 1, ctx.device)
            if i >= ctx.plan.warmup:
                enc += e
                dec += d
    return {"encoder_forward_ms": spread(enc), "decoder_forward_ms": spread(dec)}


def adamw_step_ms(model: Any, ctx: Ctx) -> dict[str, float]:
    """Median ms of the project's AdamW step (fused on CUDA) over the MAE's gradients."""
    import torch

    from pixio.runtime.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(2):
        opt.step()
    sync(ctx.device)
    ms = spread(time_steps(opt.step, ctx.plan.steps, ctx.device))
    model.zero_grad(set_to_none=True)
    return {"fused": bool(opt.defaults.get("fused")), **ms}


@dataclass
class MAEStep:
    """A built MAE, its input batch and one training step (forward + backward)."""

    model: Any
    x: Any
    step: Callable[[], None]


def mae_step(ctx: Ctx, m: dict[str, Any], compiled: str) -> MAEStep:
    """Build the plan's MAE as the trainer does (meta, then seeded init on the device) and its
    step: `compiled` none (eager), blocks (each block compiled apart by
    pixio.runtime.compile.compile_units, what train.compile does) or model (torch.compile of the
    whole model, for comparison). Runs the first step."""
    import torch

    from pixio import build_mae
    from pixio.models.flops import mae_model_flops
    from pixio.runtime.compile import compile_units, training_path
    from pixio.runtime.parallel import materialize

    plan, dev = ctx.plan, ctx.device
    torch.manual_seed(0)
    kwargs, start = dict(plan.mae), time.perf_counter()
    with torch.device("meta"):
        model = build_mae(kwargs.pop("name"), **kwargs)
    model = materialize(model, torch.device(dev)).train()
    m["build_s"] = round(time.perf_counter() - start, 1)
    size = model.grid_size[0] * model.patch_size
    x = torch.randn(plan.batch, 3, size, size, device=dev)
    flops = mae_model_flops(model, mask_ratio=MASK_RATIO)
    m.update(model=plan.mae, batch=plan.batch, img_size=size, mask_ratio=MASK_RATIO, compiled=compiled,
             precision="bf16 autocast, fp32 weights" if plan.bf16 else "fp32", flops_per_step=flops.train * plan.batch,
             gflops_per_image={"train": flops.train / 1e9, "encoder_forward": flops.encoder / 1e9, "decoder_forward": flops.decoder / 1e9})  # fmt: skip
    net = torch.compile(model) if compiled == "model" else model
    if compiled == "blocks":
        compile_units([*model.blocks, *model.decoder_blocks], training_path)

    def step() -> None:
        with ctx.autocast():
            loss = net(x, mask_ratio=MASK_RATIO).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    sync(dev)
    m["first_step_s"] = round(time.perf_counter() - start, 2)  # compilation included
    return MAEStep(model, x, step)


def throughput(ctx: Ctx, m: dict[str, Any], step_ms: list[float]) -> None:
    """Step-time spread, img/s, TFLOP/s and MFU of `step_ms` into `m` (after mae_step)."""
    from pixio.models.flops import utilization

    ms = spread(step_ms)
    util = utilization(m["flops_per_step"], ms["median"] / 1e3, 1, device_name(ctx.device))
    m.update(step_ms=ms, images_per_s=round(m["batch"] / (ms["median"] / 1e3), 1), tflops=float(f"{util.tflops:.4g}"),
             mfu=None if util.mfu is None else round(util.mfu, 4), peak_tflops=util.peak_tflops)  # fmt: skip


def mae_bench(ctx: Ctx, m: dict[str, Any], compiled: str) -> None:
    """The MAE benchmark: warm-up, timed steps, throughput, peak memory, kernel count; eager
    also the encoder / decoder forward split and the AdamW step."""
    import torch

    run = mae_step(ctx, m, compiled)
    for _ in range(ctx.plan.warmup):
        run.step()
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    throughput(ctx, m, time_steps(run.step, ctx.plan.steps, ctx.device))
    if ctx.device == "cuda":
        m["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    m["profile"] = kernel_count(run.step, ctx.device)
    if compiled == "none":
        m.update(forward_split(run.model, run.x, ctx), adamw_step_ms=adamw_step_ms(run.model, ctx))


def last_line(text: str) -> str:
    """The last non-empty line of `text` (an error's message), or ''."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
