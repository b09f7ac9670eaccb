"""The one training loop shared by pre-training and distillation.

A job builds a `Task` (its model wrapper) and a data stream and hands them to `Trainer.fit()`.
The trainer owns precision, parallelism (DDP / FSDP), the optimiser and lr schedule, gradient
accumulation, logging, pictures, checkpoints and resume, and pre-emption.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pixio.runtime import checkpointing, optim
from pixio.runtime.checkpointing import CheckpointManager
from pixio.runtime.distributed import DistInfo, all_reduce_mean, is_dist, reduce_device
from pixio.runtime.logging import MetricsWriter, Throughput, WandbLogger, format_progress
from pixio.runtime.parallel import choose_parallel, fully_shard_model, materialize
from pixio.runtime.preemption import PreemptionHandler
from pixio.runtime.runconfig import write_run_config
from pixio.runtime.task import Task
from pixio.runtime.vis import save_png

log = logging.getLogger("pixio.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting the last checkpoint."""


@dataclass
class Progress:
    """Where the loop is: `iteration` counts data iterations (micro-batches) done."""

    iteration: int = 0
    samples_seen: int = 0


def autocast_dtype(precision: str) -> torch.dtype | None:
    """bf16 / fp16 autocast dtype; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class Trainer:
    """Runs `task` on `data` under the `train`/`optim` config; see module docstring.

    `data` is either a loader with `iterate(start_iteration)` (and optionally `state_dict` /
    `load_state_dict`, stored per rank in checkpoints so a resume continues its stream exactly),
    or any re-iterable of batches (one pass per epoch, fast-forwarded on resume).
    """

    def __init__(
        self, cfg: Any, task: Task, data: Iterable, info: DistInfo, config_dict: dict
    ) -> None:
        self.cfg, self.task, self.data, self.info = cfg, task, data, info
        self.config_dict = config_dict
        self.t, self.o = cfg.train, cfg.optim
        self.output_dir = Path(cfg.output_dir)
        self.device = info.device  # chosen by init_distributed(device=train.device)
        self.amp_dtype = autocast_dtype(self.t.precision)
        self.progress = Progress()
        self._saved_at = -1  # iteration of the last checkpoint written or loaded
        self.grad_norm = float("nan")  # of the last optimiser step
        self._window: list[float] = []  # losses since the last log line (logged as their mean)
        self.total_iters = self.t.epochs * self.t.iters_per_epoch
        self.global_batch = self.t.batch_size * self.t.accum_iter * info.world_size
        self.base_lr = optim.resolve_lr(self.o.lr, self.o.blr, self.global_batch)
        # Asynchronous saves pay off where staging (a device-to-host copy) is much faster than
        # the write: on GPUs. On the CPU the state already is in host memory.
        async_save = self.t.async_save
        if async_save is None:
            async_save = self.device.type == "cuda"
        self.checkpoints = CheckpointManager(
            self.output_dir, self.t.keep_last, self.t.keep_every, async_save
        )
        # Any checkpoint on disk, complete-looking or not: a run with checkpoints resumes from
        # one or stops (CheckpointError), never silently starts over. Rank 0's view for all.
        self.has_checkpoints = _on_every_rank(checkpointing.has_checkpoints(self.output_dir))
        # A run that will load a checkpoint skips the (CPU-bound, at 5B) weight initialisation.
        self.model = self._wrap(task.model, initialize=not self.has_checkpoints)
        self.optimizer = optim.build_optimizer(
            task.model, self.base_lr, self.o.weight_decay, tuple(self.o.betas), self.o.fused
        )
        # A gradient scaler only for fp16: bf16 and fp32 have fp32's exponent range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.t.precision == "fp16")
        self.metrics = MetricsWriter(self.output_dir, enabled=info.rank == 0)
        self.wandb = WandbLogger(cfg.logger, self.output_dir, config_dict, enabled=info.rank == 0)
        self.preemption = PreemptionHandler()
        self.throughput = Throughput()

    # ---- set-up ---------------------------------------------------------------------------
    def _wrap(self, model: nn.Module, initialize: bool) -> nn.Module:
        """Activation checkpointing, then FSDP (shard, then materialise the local shard) or
        materialise then DDP, then torch.compile, as configured (pixio.runtime.parallel)."""
        if self.t.activation_checkpointing and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        width = getattr(model, "embed_dim", 0)
        self.parallel = choose_parallel(self.t.parallel, width, self.info.world_size)
        if self.parallel == "fsdp":
            model = fully_shard_model(model, self.task.shard_units(), self.amp_dtype)
        model = materialize(model, self.device, initialize)
        if self.parallel == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.t.compile:
            model = torch.compile(model)
        return model

    # ---- checkpoints ----------------------------------------------------------------------
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded model state with reference key names (collective; rank 0 holds it, on the
        CPU, when distributed). For exports and tests: checkpoints never gather it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=is_dist())
        return get_model_state_dict(self.task.model, options=options)

    def _app_state(self) -> dict[str, Any]:
        """What DCP saves and loads in place: this rank's model and optimiser shards."""
        return {
            "model": get_model_state_dict(self.task.model),
            "optimizer": get_optimizer_state_dict(self.task.model, self.optimizer),
        }

    def _meta(self) -> dict[str, Any]:
        """The small, plain part of a checkpoint (rank 0 writes it; weights_only-safe)."""
        return {
            "iteration": self.progress.iteration,
            "epoch": self.progress.iteration // self.t.iters_per_epoch,
            "samples_seen": self.progress.samples_seen,
            "scaler": self.scaler.state_dict(),
            "rng": _gather(checkpointing.capture_rng_state()),
            "data": _gather(self._data_state()),
            "world_size": self.info.world_size,
            "config": self.config_dict,
        }

    def _data_state(self) -> dict[str, Any] | None:
        state_dict = getattr(self.data, "state_dict", None)
        return state_dict() if callable(state_dict) else None

    def save(self) -> Path:
        """Write a sharded checkpoint (collective: every rank writes its own files)."""
        path = self.checkpoints.save(self.progress.iteration, self._app_state(), self._meta())
        self._saved_at = self.progress.iteration  # the manager logs the save
        return path

    def resume(self) -> bool:
        """Load the newest good checkpoint in output_dir, if any. Returns True when resumed."""
        if not self.has_checkpoints:
            # Not even a template: building the optimiser's state dict runs a zero-lr step to
            # create AdamW's state, which would shift its bias correction by one step.
            return False
        state = self._app_state()
        found = self.checkpoints.load_latest(state)
        if found is None:
            return False
        path, meta = found
        set_model_state_dict(self.task.model, state["model"])
        set_optimizer_state_dict(self.task.model, self.optimizer, state["optimizer"])
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.progress = Progress(meta["iteration"], meta.get("samples_seen", 0))
        self._restore_streams(meta)
        self._saved_at = self.progress.iteration
        self.metrics.rewind(self.progress.iteration)  # drop records logged after this checkpoint
        log.info("resumed from %s at iteration %d", path, self.progress.iteration)
        return True

    def _restore_streams(self, meta: dict[str, Any]) -> None:
        """Same world size: every rank continues its own RNG and data streams. Otherwise the
        streams start afresh (the loader logs that); weights and optimiser are resharded."""
        if meta.get("world_size") != self.info.world_size:
            log.warning(
                "checkpoint written by %s processes, resuming with %d: fresh random streams "
                "(training continues, but not bit-identically)",
                meta.get("world_size"), self.info.world_size,
            )  # fmt: skip
        elif meta.get("rng"):
            checkpointing.restore_rng_state(meta["rng"][self.info.rank])
        # The loader compares the saved layout with its own and says what changed, if anything.
        data_states = meta.get("data") or []
        load = getattr(self.data, "load_state_dict", None)
        if callable(load) and len(data_states) > self.info.rank and data_states[self.info.rank]:
            load(data_states[self.info.rank])

    # ---- the loop -------------------------------------------------------------------------
    def batches(self, start: int) -> Iterator[tuple[int, Any]]:
        """(iteration, batch) from `start` until the schedule ends."""
        if hasattr(self.data, "iterate"):  # a stream that resumes itself (EpochLoader)
            return zip(range(start, self.total_iters), self.data.iterate(start), strict=False)
        return self._epoch_batches(start)

    def _epoch_batches(self, start: int) -> Iterator[tuple[int, Any]]:
        """A plain re-iterable: one pass per epoch; a mid-epoch resume fast-forwards (the
        skipped batches are produced and dropped, so keep such data cheap)."""
        ipe = self.t.iters_per_epoch
        for epoch in range(start // ipe, self.t.epochs):
            if hasattr(self.data, "set_epoch"):
                self.data.set_epoch(epoch)
            stream = iter(self.data)
            first = epoch * ipe
            for _ in range(first, max(first, start)):
                next(stream)
            for it in range(max(first, start), first + ipe):
                yield it, next(stream)

    def fit(self) -> None:
        """Train until the schedule (or train.max_iters) ends; save and export at the end."""
        self.resume()
        if self.info.rank == 0:  # config.yaml once; a resume with other settings adds its own
            write_run_config(self.output_dir, self.config_dict, self.progress.iteration)
        self.preemption.install()
        stop = self.t.max_iters if self.t.max_iters is not None else self.total_iters
        stop = min(stop, self.total_iters)
        log.info(
            "training %s: %d iterations, global batch %d, lr %.3g, parallel=%s, device=%s",
            type(self.task.model).__name__, stop, self.global_batch, self.base_lr, self.parallel, self.device,
        )  # fmt: skip
        try:
            if self.progress.iteration < stop:
                self._loop(stop)
            if self.progress.iteration >= stop:
                self._finish()
        finally:
            self.preemption.uninstall()  # Ctrl-C behaves normally again after the run

    def _loop(self, stop: int) -> None:
        tick = time.perf_counter()
        for it, batch in self.batches(self.progress.iteration):
            data_time = time.perf_counter() - tick
            batch = self.task.to_device(batch, self.device)
            loss = self.train_iteration(it, batch)
            images = self.task.batch_size(batch) * self.info.world_size
            self.progress.iteration = it + 1
            self.progress.samples_seen += images
            self.throughput.update(images, time.perf_counter() - tick, data_time)
            if self._after_iteration(it + 1, loss, batch, stop):
                return
            tick = time.perf_counter()

    def _after_iteration(self, done: int, loss: float, batch: Any, stop: int) -> bool:
        """Logging, pictures, checkpoints, pre-emption. Returns True to leave the loop."""
        boundary = done % self.t.accum_iter == 0
        self._window.append(loss)
        if done % self.t.log_every == 0 or done == stop:
            self._log(done, sum(self._window) / len(self._window), stop)
            self._window.clear()
        if self.t.vis_every and done % self.t.vis_every == 0:
            self._visualize(done, batch)
        if boundary and (done % self.t.save_every_iters == 0) and done < stop:
            self.save()
        if boundary and self.preemption.requested():
            log.warning("stop signal received: saving at iteration %d", done)
            if self._saved_at != done:
                self.save()
            self.close()  # finish the save, flush metrics / wandb; the process group stays up
            self.preemption.requeue_and_exit(done)
        return done >= stop

    def train_iteration(self, it: int, batch: Any) -> float:
        """One micro-batch: forward, backward, and at accumulation boundaries the optimiser step."""
        accum = self.t.accum_iter
        if it % accum == 0:
            epoch_f = it / self.t.iters_per_epoch
            lr = optim.lr_at(
                epoch_f, self.base_lr, self.o.min_lr, self.o.warmup_epochs, self.t.epochs
            )
            optim.set_lr(self.optimizer, lr)
        boundary = (it + 1) % accum == 0
        with self._no_sync(not boundary):  # must cover backward, where the all-reduce happens
            with self._autocast():
                loss = self.task.step(self.model, batch)["loss"]
            self.scaler.scale(loss / accum).backward()
        loss_value = float(all_reduce_mean(loss))  # same on every rank: all stop together on NaN
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at iteration {it}: stopping. The last good checkpoint in "
                f"{self.output_dir} is untouched; lower the lr or check the data."
            )
        if boundary:
            self.grad_norm = self._optimizer_step()
        return loss_value

    def _optimizer_step(self) -> float:
        """Unscale, (optionally) clip, step, zero grads; returns the pre-clip gradient norm."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.o.clip_grad if self.o.clip_grad is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _no_sync(self, skip_sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on accumulation micro-steps."""
        # FSDP keeps syncing: each micro-step reduce-scatters into the sharded gradients, so
        # accumulation never holds an unsharded fp32 gradient (22 GB per GPU at 5B); the price
        # is one reduce-scatter per micro-step instead of one per optimiser step.
        if skip_sync and self.parallel == "ddp":
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- reporting ------------------------------------------------------------------------
    def _log(self, done: int, loss: float, stop: int) -> None:
        stats = self.throughput.summary()
        record = {
            "step": done,
            "epoch": done / self.t.iters_per_epoch,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": self.grad_norm,
            "images_per_s": stats["images_per_s"],
            "data_wait": stats["data_wait"],
            "max_mem_gb": max_memory_gb(self.device),
            **self._skipped(),
        }
        if self.info.rank == 0:
            eta = stats["step_time"] * (stop - done)
            log.info(format_progress(done, stop, eta, record))
        self.metrics.write(record)
        self.wandb.log(record, step=done)

    def _skipped(self) -> dict[str, int]:
        """Samples the data pipeline dropped since this process started, by reason, summed over
        ranks (`skipped/<reason>`; zero counts left out). Collective when distributed."""
        counts = self.data.skip_counts() if hasattr(self.data, "skip_counts") else {}
        reasons = sorted(counts)  # every rank's pipeline lists the same reasons
        if not reasons:
            return {}
        totals = torch.tensor([counts[r] for r in reasons], dtype=torch.float64)
        if is_dist():
            totals = totals.to(reduce_device())
            dist.all_reduce(totals)
        return {f"skipped/{r}": int(n) for r, n in zip(reasons, totals.tolist(), strict=True) if n}

    def _visualize(self, done: int, batch: Any) -> None:
        """Every rank runs the forward (FSDP needs all ranks); rank 0 writes the picture."""
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            picture = self.task.visualize(self.model, batch)
        self.model.train(was_training)
        if picture is not None and self.info.rank == 0:
            path = save_png(picture, self.output_dir / "vis" / f"step{done}.png")
            self.wandb.log_image("reconstruction", path, step=done)

    def _finish(self) -> None:
        """Final checkpoint, exported artifacts, closing the loggers."""
        if self._saved_at != self.progress.iteration:  # not when re-run after the end
            self.save()
        state = self.full_model_state()
        if self.info.rank == 0:
            for path in self.task.export(state, self.output_dir):
                log.info("wrote %s", path)
        self.close()

    def close(self) -> None:
        """Finish a pending asynchronous save, flush and close the loggers."""
        self.checkpoints.close()
        self.metrics.close()
        self.wandb.finish()


def _on_every_rank(value: Any) -> Any:
    """Rank 0's `value` on every rank (small, picklable objects only)."""
    if not is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (small, picklable objects only)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
