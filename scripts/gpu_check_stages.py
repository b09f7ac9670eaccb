"""The stages of scripts/gpu_check.py, each run in its own process by `run(name, ...)`.

A stage fills `m` (its metrics, kept even when it fails) and raises on a failed check. The jobs
run through their real entry points (`python -m pretraining.train ...`) with their output in
the check's log. Plans, timing and the MAE benchmark: scripts/gpu_check_common.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_check_common import (
    MASK_RATIO,
    PLANS,
    ROOT,
    Ctx,
    job,
    last_line,
    mae_bench,
    metrics_by_step,
    sync,
)


# ---- env ---------------------------------------------------------------------------------------
def nvidia_smi(field_name: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None  # fmt: skip


def stage_env(ctx: Ctx, m: dict[str, Any]) -> None:
    import platform

    import torch
    import torchvision

    from pixio.models.flops import peak_bf16_tflops

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    m.update(python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
             torchvision=torchvision.__version__, cuda_build=torch.version.cuda,
             cudnn=torch.backends.cudnn.version(), cpu_count=os.cpu_count(),
             git_commit=git.stdout.strip() or None, cuda_available=torch.cuda.is_available())  # fmt: skip
    try:
        import triton

        m["triton"] = triton.__version__
    except ImportError:
        m["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()
        m.update(device=p.name, devices=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                 memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                 nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                 driver=nvidia_smi("driver_version"), peak_bf16_tflops=peak_bf16_tflops(p.name))  # fmt: skip
    if ctx.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"CUDA is not available to torch {torch.__version__}: for the CPU mode run scripts/gpu_check.sh --cpu")  # fmt: skip


# ---- pre-training demo: stopped + resumed vs uninterrupted ---------------------------------------
def demo_data_overrides(ctx: Ctx, m: dict[str, Any]) -> list[str]:
    """The demo shards, built here first (in parallel): the shipped set under data/demo on the
    GPU (what `make demo` uses), a small one under the output folder on the CPU."""
    from pixio.data.demo import ensure_demo_data, is_demo_root

    workers = max(1, min(8, os.cpu_count() or 1))
    if ctx.plan.demo_data is None:
        root = ROOT / "data" / "demo"
        if root.is_dir() and any(root.iterdir()) and not is_demo_root(root):
            raise RuntimeError(f"{root} holds other data, not the demo set: move it away (the demo builds there)")  # fmt: skip
        built = ensure_demo_data(root, workers=workers)
        m["demo_data"] = {"root": "data/demo", "built_s": built["seconds"]}
        return []
    built = ensure_demo_data(ctx.out / "demo_data", workers=1, **ctx.plan.demo_data)
    m["demo_data"] = {"root": str(ctx.out / "demo_data"), "built_s": built["seconds"]}
    return ["data.build_demo=false", f"data.root={built['shards']}", f"data.json_root={built['json_root']}"]  # fmt: skip


def resume_check(ctx: Ctx, m: dict[str, Any], name: str, extra: list[str], tol: float) -> None:
    """Three runs of the demo: A stopped at `stop_at` then resumed, B uninterrupted; every logged
    loss and the exported encoder of A must equal B's within `tol`."""
    base = ["experiment=demo", f"train.device={ctx.device}", *ctx.plan.pretrain, *demo_data_overrides(ctx, m), *extra]  # fmt: skip
    a, b = ctx.dir(f"{name}_a"), ctx.dir(f"{name}_b")
    stop = ctx.plan.stop_at
    m["stopped_s"] = job("pretraining.train", [*base, f"output_dir={a}", f"train.max_iters={stop}"])
    m["resumed_s"] = job("pretraining.train", [*base, f"output_dir={a}"])
    m["uninterrupted_s"] = job("pretraining.train", [*base, f"output_dir={b}"])
    log = (a / "train.log").read_text()
    if f"at iteration {stop}" not in log:
        raise AssertionError(f"{a}/train.log: no 'resumed from ... at iteration {stop}' line")
    m["parallel"] = next((ln.split("parallel: ")[1].split(",")[0] for ln in log.splitlines() if "parallel: " in ln), None)  # fmt: skip
    ra, rb = metrics_by_step(a), metrics_by_step(b)
    steps = sorted(rb)
    if sorted(ra) != steps:
        raise AssertionError(f"logged steps differ: resumed {sorted(ra)}, uninterrupted {steps}")
    loss = max(abs(ra[s]["loss"] - rb[s]["loss"]) for s in steps)
    from safetensors.torch import load_file

    wa, wb = load_file(a / "encoder.safetensors"), load_file(b / "encoder.safetensors")
    weights = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wb)
    m.update(steps=steps[-1], loss_max_diff=loss, weight_max_diff=weights, bit_identical=loss == 0 and weights == 0,
             final_loss=rb[steps[-1]]["loss"], images_per_s=rb[steps[-1]].get("images_per_s"),
             checkpoints=sorted(p.name for p in a.glob("checkpoint-0*")))  # fmt: skip
    if loss > tol or weights > tol:
        raise AssertionError(f"resumed run differs from the uninterrupted one: loss {loss:.3g}, weights {weights:.3g} (tolerance {tol:g})")  # fmt: skip


def stage_pretrain_resume(ctx: Ctx, m: dict[str, Any]) -> None:
    resume_check(ctx, m, "pretrain", ["train.async_save=true"], ctx.plan.tolerance)


def stage_trainer_keys(ctx: Ctx, m: dict[str, Any]) -> None:
    """The trainer with the keys of a large run. One process: the trainer places the module
    without a wrapper (FSDP needs more than one rank there); stage fsdp2 checks FSDP2 itself."""
    keys = ["train.parallel=fsdp", f"train.compile={str(ctx.plan.compile).lower()}",
            "train.activation_checkpointing=true", f"train.precision={'bf16' if ctx.plan.bf16 else 'fp32'}", "train.async_save=true"]  # fmt: skip
    m["keys"] = keys
    resume_check(ctx, m, "trainer_keys", keys, 1e-3)  # bf16: allow for kernel differences


# ---- FSDP2 on a one-rank process group ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardedMAE:
    """An MAE built on meta, sharded with FSDP2 (pixio.runtime.parallel), materialised from its
    seeds, with activation checkpointing, each block compiled apart (as train.compile does) or
    not, and the project's AdamW."""

    def __init__(self, ctx: Ctx, seed: int, compiled: bool) -> None:
        import torch

        from pixio import build_mae
        from pixio.runtime.compile import compile_units, training_path
        from pixio.runtime.optim import build_optimizer
        from pixio.runtime.parallel import fully_shard_model, materialize

        self.ctx, kwargs = ctx, dict(ctx.plan.fsdp_mae)
        torch.manual_seed(seed)
        with torch.device("meta"):
            self.model = build_mae(kwargs.pop("name"), **kwargs)
        units = [*self.model.blocks, *self.model.decoder_blocks]
        fully_shard_model(self.model, units, torch.bfloat16 if ctx.plan.bf16 else None)
        materialize(self.model, torch.device(ctx.device))
        self.model.set_grad_checkpointing(True)
        if compiled:  # the blocks, not the sharded root: FSDP's hooks stay eager around them
            compile_units(units, training_path)
        self.opt = build_optimizer(self.model, lr=1e-3, weight_decay=0.05)

    def step(self, i: int) -> float:
        """One step on batch `i` (a fixed function of i); the masking draws from the global RNG."""
        import torch

        size = self.model.grid_size[0] * self.model.patch_size
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(self.ctx.plan.fsdp_batch, 3, size, size, generator=g).to(self.ctx.device)
        with self.ctx.autocast():
            loss = self.model(x, mask_ratio=MASK_RATIO).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)

    def state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        return {"model": get_model_state_dict(self.model), "optimizer": get_optimizer_state_dict(self.model, self.opt)}  # fmt: skip

    def load(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"])

    def weights(self) -> list[Any]:
        return [p.detach().to_local().float().clone() for p in self.model.parameters()]


def round_trip(ctx: Ctx, m: dict[str, Any], compiled: bool) -> None:
    """Two steps, a DCP save with the RNG states, two more; a model of other weights loads the
    checkpoint and the RNG states and must take the same two steps."""
    import torch

    from pixio.runtime.checkpointing import CheckpointManager, capture_rng_state, restore_rng_state

    start = time.perf_counter()
    a = ShardedMAE(ctx, seed=0, compiled=compiled)
    m["losses_before_save"] = [a.step(i) for i in range(2)]
    m["first_steps_s"] = round(time.perf_counter() - start, 1)  # build, compile, two steps
    manager = CheckpointManager(ctx.dir("fsdp2_checkpoints"), async_save=ctx.device == "cuda")
    rng, start = capture_rng_state(), time.perf_counter()
    manager.save(2, a.state(), {"rng": rng})
    manager.wait()
    m["save_s"] = round(time.perf_counter() - start, 2)
    expected, after = [a.step(i) for i in (2, 3)], a.weights()
    b = ShardedMAE(ctx, seed=1, compiled=compiled)  # other weights: the load must replace all
    state = b.state()
    _, meta = manager.load_latest(state)
    manager.close()
    b.load(state)
    restore_rng_state(meta["rng"])
    m["rng_round_trip"] = torch.equal(torch.get_rng_state(), rng["torch"]) and (
        ctx.device != "cuda" or torch.equal(torch.cuda.get_rng_state(), rng["cuda"][0]))  # fmt: skip
    got = [b.step(i) for i in (2, 3)]
    diff = max(float((x - y).abs().max()) for x, y in zip(after, b.weights(), strict=True))
    m.update(losses_uninterrupted=expected, losses_resumed=got, weight_max_diff=diff)
    loss = max(abs(x - y) for x, y in zip(expected, got, strict=True))
    if not m["rng_round_trip"] or loss > ctx.plan.tolerance or diff > ctx.plan.tolerance:
        raise AssertionError(f"resume after DCP load differs: rng restored {m['rng_round_trip']}, loss {loss:.3g}, weights {diff:.3g}")  # fmt: skip


def stage_fsdp2(ctx: Ctx, m: dict[str, Any]) -> None:
    """FSDP2 on a one-rank group (NCCL on the GPU): the round trip compiled (GPU plans), and
    eagerly if compilation fails there, so a compile failure still leaves DCP and RNG checked."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl" if ctx.device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        m.update(backend=dist.get_backend(), model=ctx.plan.fsdp_mae, activation_checkpointing=True)  # fmt: skip
        m["compiled"] = {}
        compile_error = None
        if ctx.plan.compile:
            try:
                round_trip(ctx, m["compiled"], compiled=True)
                return
            except Exception as exc:  # recorded; the eager round trip below still runs
                compile_error = m["compiled"]["error"] = last_line(f"{type(exc).__name__}: {exc}")  # fmt: skip
        m["eager"] = {}
        round_trip(ctx, m["eager"], compiled=False)
        if compile_error:
            raise RuntimeError(f"compiled: {compile_error} (the eager round trip passed)")
    finally:
        dist.destroy_process_group()


# ---- the evaluation and distillation demos -----------------------------------------------------
def demo_encoder(ctx: Ctx, group: str = "encoder") -> list[str]:
    """`<group>.checkpoint` (the pre-training stage's encoder when it ran, else an absent path:
    the demos then say they use random weights) and that encoder's size overrides."""
    path = ctx.out / "pretrain_b" / "encoder.safetensors"
    return [f"{group}.checkpoint={path}", *(f"{group}.{k}={v}" for k, v in ctx.plan.demo_encoder.items())]  # fmt: skip


def eval_demo(ctx: Ctx, m: dict[str, Any], app: str, experiment: str, dataset: str) -> None:
    out = ctx.dir(experiment)
    overrides = [f"experiment={experiment}", f"train.device={ctx.device}", f"output_dir={out}",
                 f"data.root={ctx.out / 'eval_data' / dataset}", *demo_encoder(ctx), *ctx.plan.eval_extra]  # fmt: skip
    m["seconds"] = job(f"evaluation.{app}", overrides)
    results = json.loads((out / "results.json").read_text())
    m.update(final=results["final"], random_weights=results["encoder"]["random_weights"])


def stage_depth_demo(ctx: Ctx, m: dict[str, Any]) -> None:
    eval_demo(ctx, m, "depth", "depth_demo", "nyuv2")


def stage_semseg_demo(ctx: Ctx, m: dict[str, Any]) -> None:
    eval_demo(ctx, m, "semseg", "semseg_demo", "ade20k")


def stage_knn_demo(ctx: Ctx, m: dict[str, Any]) -> None:
    out = ctx.dir("knn_demo")
    overrides = ["experiment=knn_demo", f"train.device={ctx.device}", f"output_dir={out}",
                 f"data.root={ctx.out / 'knn_data'}", *demo_encoder(ctx), *ctx.plan.knn_extra]  # fmt: skip
    m["seconds"] = job("evaluation.knn", overrides)
    results = json.loads((out / "results.json").read_text())
    m.update(top1=results["top1"], random_weights=results["random_weights"])


def stage_distill_demo(ctx: Ctx, m: dict[str, Any]) -> None:
    """The distillation demo with the pre-training stage's encoder as teacher, or a random one
    of the demo teacher's shape when that stage did not run."""
    teacher = demo_encoder(ctx, "teacher")
    if not (ctx.out / "pretrain_b" / "encoder.safetensors").exists():
        import torch

        from pixio import build_encoder, save_encoder

        torch.manual_seed(0)
        path = ctx.dir("random_teacher") / "encoder.safetensors"
        save_encoder(build_encoder("pixio_vitt16", **ctx.plan.demo_encoder), path)
        teacher[0] = f"teacher.checkpoint={path}"
        m["teacher"] = "random weights (pretrain_resume did not run)"
    out = ctx.dir("distill_demo")
    overrides = ["experiment=distill_demo", f"train.device={ctx.device}", f"output_dir={out}",
                 *teacher, *ctx.plan.distill, *demo_data_overrides(ctx, m)]  # fmt: skip
    m["seconds"] = job("distillation.train", overrides)
    rows = metrics_by_step(out)
    last = rows[max(rows)]
    m.update(steps=max(rows), losses={k: v for k, v in last.items() if k.startswith("loss")},
             exports=sorted(p.name for p in out.glob("encoder-*.safetensors")))  # fmt: skip
    if len(m["exports"]) != 2:
        raise AssertionError(f"{out}: expected two student exports, found {m['exports']}")


# ---- JPEG decoding -----------------------------------------------------------------------------
def jpeg_set(n: int, height: int, width: int) -> list[bytes]:
    """`n` JPEGs (quality 90) of the bundled demo photos, resized to height x width."""
    from pixio.data.demo import source_images

    _, photos, _ = source_images()
    photos = [p for p in photos if p.mode == "RGB"]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        photos[i % len(photos)].resize((width, height)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(fn: Callable[[], Any], images: int, device: str, repeats: int = 3) -> float:
    """Images per second of `fn` (which decodes `images`), best of `repeats` after a warm-up;
    wall clock to a device sync (the GPU decoder may run on streams of its own)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return round(images / min(times[1:]), 1)


def stage_jpeg(ctx: Ctx, m: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    n, h, w = ctx.plan.jpeg
    data = jpeg_set(n, h, w)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    m.update(images=n, size=f"{w}x{h}", mean_kb=round(sum(map(len, data)) / n / 1024, 1), cpu_threads=torch.get_num_threads())  # fmt: skip
    m["pil_img_s"] = rate(lambda: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in data], n, "cpu")  # fmt: skip
    m["torchvision_cpu_img_s"] = rate(lambda: [decode_jpeg(t) for t in tensors], n, "cpu")
    if ctx.device != "cuda":
        m["torchvision_gpu_img_s"] = None  # the CPU mode has no GPU decoder
        return
    m["torchvision_gpu_img_s"] = rate(lambda: decode_jpeg(tensors, device="cuda"), n, "cuda")
    cpu, gpu = decode_jpeg(tensors[0]), decode_jpeg(tensors[0], device="cuda").cpu()
    m["gpu_vs_cpu_mean_abs_diff"] = round(float((cpu.float() - gpu.float()).abs().mean()), 3)


# ---- dispatch ----------------------------------------------------------------------------------
STAGE_FUNCS: dict[str, Callable[[Ctx, dict[str, Any]], None]] = {
    "env": stage_env,
    "mae_eager": lambda ctx, m: mae_bench(ctx, m, compiled="none"),
    "mae_compiled": lambda ctx, m: mae_bench(ctx, m, compiled="blocks"),
    "mae_compiled_model": lambda ctx, m: mae_bench(ctx, m, compiled="model"),
    "pretrain_resume": stage_pretrain_resume,
    "fsdp2": stage_fsdp2,
    "trainer_keys": stage_trainer_keys,
    "depth_demo": stage_depth_demo,
    "semseg_demo": stage_semseg_demo,
    "knn_demo": stage_knn_demo,
    "distill_demo": stage_distill_demo,
    "jpeg": stage_jpeg,
}


def run(name: str, device: str, out: Path, metrics: dict[str, Any]) -> None:
    """Run stage `name` on `device` ("cuda" or "cpu"), filling `metrics`."""
    plan = PLANS[device]
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    STAGE_FUNCS[name](Ctx(device, Path(out), plan), metrics)
