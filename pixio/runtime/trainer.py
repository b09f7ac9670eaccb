"""The one training loop shared by every job (pre-training, evaluation heads, distillation).

A job builds a `Task` (pixio.runtime.task: its modules, optimisers and loss) and its data, and
hands them to `Trainer.fit()`. The trainer owns everything else: placing each module (DDP or FSDP
for trainable ones, chosen per module; frozen ones replicated or sharded, bf16 on GPUs),
precision, the optimisers with their schedules, scalers and clipping (`pixio.runtime.step`),
gradient accumulation, validation with best/final tracking, logging and pictures (the log
window: `pixio.runtime.window`), sharded checkpoints and exact resume, pre-emption, and the
exported artifacts at the end.

An iteration reads nothing from the device: the loss and metrics, the gradient norm and the
finite-loss check stay device tensors until an iteration that logs, saves, validates, draws
pictures or runs a periodic evaluation reads them (fp16's gradient scaler aside), and the
ranks' agreement on stopping is read an iteration after it started (`_loop`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pixio.runtime import checkpointing, optim
from pixio.runtime.batches import fetch, iteration_batches, iters_per_epoch
from pixio.runtime.checkpointing import CheckpointManager
from pixio.runtime.compile import compile_enabled, compile_for_training
from pixio.runtime.distributed import DistInfo, is_dist, node_group, set_deterministic
from pixio.runtime.logging import (
    METRICS_NAME,
    RUN_ID_NAME,
    MetricsWriter,
    Throughput,
    WandbLogger,
    format_progress,
    max_memory_gb,
    set_aside_stale,
)
from pixio.runtime.parallel import (
    cast_blocks,
    choose_parallel,
    frozen_block_dtype,
    fully_shard_model,
    materialize,
    num_params,
)
from pixio.runtime.preemption import Agreement, PreemptionHandler
from pixio.runtime.prefetch import DevicePrefetcher, on_batch
from pixio.runtime.runconfig import CONFIG_NAME, write_run_config
from pixio.runtime.step import (
    Stepper,
    autocast,
    autocast_dtype,
    backward,
    build_stepper,
    check_owners,
    no_sync,
    optimizer_step,
)
from pixio.runtime.task import ModuleSpec, OptimizerSpec, Periodic, Task
from pixio.runtime.train_state import app_state, load_app_state, merged, restore_streams
from pixio.runtime.validation import RESULTS_NAME, ValidationRecord, run_validation
from pixio.runtime.vis import save_png
from pixio.runtime.window import (  # NonFiniteLossError: re-exported, the trainer's error
    FiniteWatch,
    NonFiniteLossError,  # noqa: F401
    Window,
    gather,
    merge_over_ranks,
    read,
    skipped_counts,
    step_scalars,
    utilization_fields,
)

log = logging.getLogger("pixio.train")

# A run's own records: a fresh start sets aside those of a run that died before its first
# checkpoint (appending to them would repeat its steps; wandb would drop the new run's).
RUN_RECORDS = (METRICS_NAME, RESULTS_NAME, CONFIG_NAME, RUN_ID_NAME)


@dataclass
class Progress:
    """Where the loop is: `iteration` counts data iterations (micro-batches) done."""

    iteration: int = 0
    samples_seen: int = 0


@dataclass
class Due:
    """What runs after an iteration besides the window's sums (each reads the device)."""

    log: bool
    pictures: bool
    periodic: list[Periodic]
    validation: bool
    save: bool

    def __bool__(self) -> bool:
        return self.log or self.pictures or bool(self.periodic) or self.validation or self.save


class Trainer:
    """Runs `task` on `data` under the `train` config (optimisers: the task's `optim` nodes).

    `data` is a loader with `iterate(start_iteration)` (EpochLoader, MapLoader; optionally
    `state_dict(iteration)` / `load_state_dict`, kept per rank in checkpoints so a resume
    continues its stream exactly; `iteration` may be up to two less than the batches it yielded:
    the trainer fetches one batch ahead and, on CUDA, the DevicePrefetcher one more), or any re-iterable of batches (one pass per epoch,
    fast-forwarded on resume). The epoch length is `train.iters_per_epoch`, or the data's
    `len()` when that is null. `val_data` (an EvalLoader: (batch, real) pairs) enables
    validation every `train.val_every` epochs and at the end, for a task with `validation` set.
    """

    def __init__(
        self,
        cfg: Any,
        task: Task,
        data: Iterable,
        info: DistInfo,
        config_dict: dict,
        val_data: Iterable | None = None,
    ) -> None:
        self.cfg, self.task, self.data, self.info = cfg, task, data, info
        set_deterministic(cfg.train.deterministic)  # before any module is placed or run
        self.val_data = val_data
        self.config_dict = config_dict
        self.t = cfg.train
        self.output_dir = Path(cfg.output_dir)
        self.device = info.device  # chosen by init_distributed(device=train.device)
        self.amp_dtype = autocast_dtype(self.t.precision)
        self.progress = Progress()
        self._saved_at = -1  # iteration of the last checkpoint written or loaded
        self._window = Window()
        self._finite = FiniteWatch()
        self.iters_per_epoch = iters_per_epoch(self.t.iters_per_epoch, data)
        self.total_iters = self.t.epochs * self.iters_per_epoch
        self.global_batch = self.t.batch_size * self.t.accum_iter * info.world_size
        self.validation = ValidationRecord(task.validation) if task.validation else None
        self.checkpoints = self._checkpoint_manager()
        # Any checkpoint on disk, complete-looking or not: a run with checkpoints resumes from
        # one or stops (CheckpointError), never silently starts over. Rank 0's view for all.
        self.has_checkpoints = _on_every_rank(checkpointing.has_checkpoints(self.output_dir))
        if not self.has_checkpoints and info.rank == 0:
            set_aside_stale(self.output_dir, RUN_RECORDS)  # before wandb reads its run id
        self.specs = task.modules()
        self.trainable = {n: s.module for n, s in self.specs.items() if s.trainable}
        self.parallel: dict[str, str] = {}
        self._ddp: dict[str, nn.parallel.DistributedDataParallel] = {}
        # A run that will load a checkpoint skips the (CPU-bound, at 5B) weight initialisation.
        self.modules = {n: self._place(n, s) for n, s in self.specs.items()}
        self.optimizers = self._build_optimizers(task.optimizers())
        # Logged as plain `lr` / `grad_norm` when the whole job has one optimiser, else per name.
        self._one_optimizer = len({n for names in gather(sorted(self.optimizers)) for n in names}) == 1  # fmt: skip
        self.metrics = MetricsWriter(self.output_dir, enabled=info.rank == 0)
        self.wandb = WandbLogger(cfg.logger, self.output_dir, config_dict, enabled=info.rank == 0)
        self.preemption = PreemptionHandler()
        self.throughput = Throughput()

    # ---- set-up ---------------------------------------------------------------------------
    def _checkpoint_manager(self) -> CheckpointManager:
        # Asynchronous saves pay off where staging (a device-to-host copy) is much faster than
        # the write: on GPUs. On the CPU the state already is in host memory.
        async_save = self.t.async_save
        if async_save is None:
            async_save = self.device.type == "cuda"
        return CheckpointManager(self.output_dir, self.t.keep_last, self.t.keep_every, async_save)

    def _place(self, name: str, spec: ModuleSpec) -> nn.Module:
        """Put one module on its device(s); returns what `task.step` receives under `name`."""
        module, group = spec.module, spec.group
        group_size = self._group_size(name, group)
        if spec.trainable:
            if self.t.activation_checkpointing and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(True)
            wanted = spec.parallel if spec.parallel != "auto" else self.t.parallel
            choice = choose_parallel(wanted, num_params(module), group_size)
            param_dtype = self.amp_dtype  # FSDP gathers block weights in the autocast dtype
        else:
            module.requires_grad_(False).eval()
            width = cast_frozen_blocks(spec, self.device, self.t.precision)
            choice = choose_parallel(spec.parallel, num_params(module), group_size, False, width)
            param_dtype = None  # the blocks already hold their compute dtype
            if choice == "fsdp" and spec.parallel == "auto" and group is None:
                group = node_group()  # all-gathers over NVLink, not the network
        self.parallel[name] = choice
        if choice == "fsdp":
            mesh = None if group is None else _mesh_of(group, self.device)
            fully_shard_model(module, spec.shard_units, param_dtype, mesh, spec.forward_methods)
        elif spec.forward_methods and choice == "ddp":
            raise ValueError(
                f"module {name!r}: forward_methods need parallel=fsdp or none, not ddp"
            )
        # Weights come from the checkpoint (a resumed trainable module), from `load`, or from
        # the seeded initialisation, in that order; nothing is filled twice.
        restored = spec.trainable and self.has_checkpoints
        module = materialize(module, self.device, initialize=spec.load is None and not restored)
        if spec.load is not None and not restored:
            spec.load(module)
        if choice == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Gradients as views of the all-reduce buckets: one gradient copy fewer (2.5 GB, ViT-H).
            ddp = nn.parallel.DistributedDataParallel(
                module, ids, process_group=group, gradient_as_bucket_view=True
            )
            module = self._ddp[name] = ddp
        if not compile_enabled(self.t.compile, self.device):
            return module
        return compile_for_training(name, module, spec.shard_units, spec.trainable, self.trainable)

    def _group_size(self, name: str, group: dist.ProcessGroup | None) -> int:
        """Ranks that hold module `name` (1 without a process group)."""
        if not is_dist():
            return 1
        if group is not None and dist.get_rank(group) < 0:
            raise ValueError(f"module {name!r}: rank {self.info.rank} is not in its process group")
        return dist.get_world_size(group)

    def _build_optimizers(self, specs: dict[str, OptimizerSpec]) -> dict[str, Stepper]:
        """One `Stepper` per optimiser spec; every trainable module in exactly one of them."""
        check_owners(specs, self.trainable)
        return {
            name: build_stepper(
                spec,
                [self.trainable[m] for m in spec.modules],
                self._optimizer_batch(spec),
                self.t,
                self.device,
            )  # fmt: skip
            for name, spec in specs.items()
        }

    def _optimizer_batch(self, spec: OptimizerSpec) -> int:
        """Samples per step of one optimiser: its modules' gradients are averaged over their
        group only (a student trained on a subgroup sees that group's batch)."""
        sizes = {self._group_size(m, self.specs[m].group) for m in spec.modules}
        if len(sizes) > 1:
            raise ValueError(
                f"optimiser over {spec.modules}: its modules live on groups of sizes {sorted(sizes)}"
            )
        return self.t.batch_size * self.t.accum_iter * sizes.pop()

    # ---- checkpoints ----------------------------------------------------------------------
    def full_state(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """Unsharded state of trainable module `name` (the only one when None). Collective.
        Distributed, a module of all ranks is gathered to rank 0's CPU (other ranks get an
        empty dict); a module of a subgroup is gathered on every rank of that group. For
        exports and tests: checkpoints never gather it."""
        if name is None:
            (name,) = self.trainable  # exactly one trainable module
        offload = is_dist() and self.specs[name].group is None
        options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
        return get_model_state_dict(self.trainable[name], options=options)

    def _meta(self) -> dict[str, Any]:
        """The small, plain part of a checkpoint (rank 0 writes it; weights_only-safe)."""
        return {
            "iteration": self.progress.iteration,
            "epoch": self.progress.iteration // self.iters_per_epoch,
            "samples_seen": self.progress.samples_seen,
            # Every rank's (a rank may hold optimisers the others do not), merged by name.
            "scalers": merged(
                gather({n: s.scaler.state_dict() for n, s in self.optimizers.items()})
            ),
            "validation": self.validation.state_dict() if self.validation else None,
            "rng": gather(checkpointing.capture_rng_state()),
            "data": gather(self._data_state()),
            "world_size": self.info.world_size,
            "config": self.config_dict,
        }

    def _data_state(self) -> dict[str, Any] | None:
        state_dict = getattr(self.data, "state_dict", None)
        return state_dict(self.progress.iteration) if callable(state_dict) else None

    def save(self) -> Path:
        """Write a sharded checkpoint (collective: every rank writes its own files). The losses
        since the last check are checked first: a non-finite one raises NonFiniteLossError and
        nothing is written."""
        if self._finite.checked != self.progress.iteration:
            self._finite.check(self.progress.iteration, self.output_dir)
        path = self.checkpoints.save(
            self.progress.iteration, app_state(self.trainable, self.optimizers), self._meta()
        )
        self._saved_at = self.progress.iteration  # the manager logs the save
        return path

    def resume(self) -> bool:
        """Load the newest good checkpoint in output_dir, if any. Returns True when resumed."""
        if not self.has_checkpoints:
            # Not even a template: building the optimiser's state dict runs a zero-lr step to
            # create AdamW's state, which would shift its bias correction by one step.
            return False
        state = app_state(self.trainable, self.optimizers)
        found = self.checkpoints.load_latest(state)
        if found is None:
            return False
        path, meta = found
        load_app_state(state, meta, self.trainable, self.optimizers)
        if self.validation and meta.get("validation"):
            self.validation.load_state_dict(meta["validation"])
        self.progress = Progress(meta["iteration"], meta.get("samples_seen", 0))
        self._finite.checked = self.progress.iteration
        restore_streams(meta, self.info.rank, self.info.world_size, self.data)
        self._saved_at = self.progress.iteration
        self.metrics.rewind(self.progress.iteration)  # drop records logged after this checkpoint
        log.info("resumed from %s at iteration %d", path, self.progress.iteration)
        return True

    # ---- the loop -------------------------------------------------------------------------
    def batches(self, start: int) -> Iterator[tuple[int, Any]]:
        """(iteration, batch) from `start` until the schedule ends."""
        return iteration_batches(self.data, start, self.iters_per_epoch, self.t.epochs)

    def fit(self) -> None:
        """Train until the schedule (or train.max_iters) ends; save and export at the end."""
        self.resume()
        if self.info.rank == 0:  # config.yaml once; a resume with other settings adds its own
            write_run_config(self.output_dir, self.config_dict, self.progress.iteration)
        self.preemption.install()
        stop = self.t.max_iters if self.t.max_iters is not None else self.total_iters
        stop = min(stop, self.total_iters)
        placement = ", ".join(f"{n}={p}" for n, p in self.parallel.items())
        log.info(
            "training %s: %d iterations (%d per epoch), global batch %d, lr %s, parallel: %s, device=%s",
            type(self.task).__name__, stop, self.iters_per_epoch, self.global_batch,
            ", ".join(f"{n} {s.schedule.base_lr:.3g}" for n, s in self.optimizers.items()),
            placement, self.device,
        )  # fmt: skip
        try:
            if self.progress.iteration < stop:
                self._loop(stop)
            if self.progress.iteration >= stop:
                self._finish()
        finally:
            self.preemption.uninstall()  # Ctrl-C behaves normally again after the run

    def _loop(self, stop: int) -> None:
        """Fetch one batch ahead, agree on stopping, step, report, until `stop`.

        The next batch is fetched before the step, and the ranks' agreement on it (a stop
        signal, a rank's failed fetch) starts right after that fetch and is read after the
        step: no rank steps without a batch, and the host never waits for the device to agree.
        A signal that arrives during step k is thus acted on after step k + 1, except when
        iteration k already waited for the device (it logged, saved, validated, drew pictures
        or ran a periodic evaluation): then the ranks agree again at once, after step k, as a
        fully synchronous loop would. The check runs once more after the last step."""
        move = on_batch(lambda batch: self.task.to_device(batch, self.device))
        batches = DevicePrefetcher(self.batches(self.progress.iteration), move, self.device)
        ahead = fetch(batches, self.progress.iteration < stop)
        agreement = self.preemption.start_agreement(ahead.failure is not None)
        synced = False  # the first agreement has no step queued behind it
        while True:
            tick = time.perf_counter()
            if synced:  # the device is idle anyway: agree on the state after the step
                agreement.result()  # (started before the step: every rank reads it, in order)
                agreement = self.preemption.start_agreement(ahead.failure is not None)
            self._stop_if_requested(agreement, ahead.failure)
            if ahead.item is None:
                return
            it, batch = ahead.item
            ahead = fetch(batches, it + 1 < stop)  # the wait for data inside this iteration
            agreement = self.preemption.start_agreement(ahead.failure is not None)
            values = self.train_iteration(it, batch)
            samples = self.task.batch_size(batch) * self.info.world_size
            self.progress.iteration = it + 1
            self.progress.samples_seen += samples
            timing = (tick, ahead.seconds, samples)
            synced = self._after_iteration(it + 1, values, batch, stop, timing)

    def _stop_if_requested(self, agreement: Agreement, failure: Exception | None) -> None:
        """Collective, every iteration. When a rank got a stop signal (acted on at accumulation
        boundaries) or a rank's fetch failed, every rank saves the last completed iteration
        (exact: the data position lives in this process, and a batch fetched but not used is
        not counted) and stops: exit 143 after a signal, else the fetch's error."""
        done = self.progress.iteration
        stop, failed_rank = agreement.result()
        boundary = done % self.t.accum_iter == 0
        if failed_rank is None and not (stop and boundary):
            return
        if failure is not None:
            log.error("data loading failed after iteration %d: %s", done, failure)
        if boundary and done > 0 and self._saved_at != done:
            why = "stop signal" if stop else "data loading failed"
            log.warning("%s: saving at iteration %d", why, done)
            self.save()
        self.close()  # finish the save, flush metrics / wandb; the process group stays up
        if stop and boundary:
            self.preemption.requeue_and_exit(done, saved=done > 0)
        if failure is not None:
            raise failure
        raise RuntimeError(
            f"rank {failed_rank}'s data loader failed after iteration {done} (its log has the "
            "error); every rank stops"
        )

    def _due(self, done: int, stop: int) -> Due:
        boundary = done % self.t.accum_iter == 0
        return Due(
            log=done % self.t.log_every == 0 or done == stop,
            pictures=bool(self.t.vis_every) and done % self.t.vis_every == 0,
            periodic=[p for p in self.task.periodic() if done % p.every == 0],
            validation=self._validation_due(done),
            save=boundary and done % self.t.save_every_iters == 0 and done < stop,
        )

    def _after_iteration(
        self, done: int, values: dict[str, torch.Tensor], batch: Any, stop: int,
        timing: tuple[float, float, int],
    ) -> bool:  # fmt: skip
        """The window's sums, then what is due: logging, pictures, periodic evaluations,
        validation, periodic checkpoints. Returns True when any ran (the host waited for the
        device): the finite-loss check runs first, and its wait counts in the step time."""
        self._window.add(values)
        self._finite.add(done - 1, values["loss"])
        due = self._due(done, stop)
        if due:
            self._finite.check(self.progress.iteration, self.output_dir)
        tick, data_time, samples = timing
        self.throughput.update(samples, time.perf_counter() - tick, data_time)
        if due.log:
            self._log(done, stop, batch)
        if due.pictures:
            self._pictures(done, batch)
        for periodic in due.periodic:
            self._periodic(done, periodic)
        if due.validation:
            self.validate()
        if due.save:
            self.save()
        return bool(due)

    def train_iteration(self, it: int, batch: Any) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, backward, and at accumulation boundaries the optimiser
        steps. Returns this rank's scalars, `loss` and the task's metrics, as 0-dim float64
        device tensors (read, and merged over ranks, when logged). Reads nothing from the
        device, but for fp16's gradient scaler (`found_inf`)."""
        accum = self.t.accum_iter
        if it % accum == 0:
            epoch = it / self.iters_per_epoch
            for stepper in self.optimizers.values():
                optim.set_lr(stepper.optimizer, stepper.schedule(epoch))
        boundary = (it + 1) % accum == 0
        with no_sync(self._ddp, not boundary):  # must cover backward, where the all-reduce happens
            with autocast(self.device, self.amp_dtype):
                out = self.task.step(self.modules, batch)
            backward(out, self.optimizers, accum, self.t.precision)
        if boundary:
            for stepper in self.optimizers.values():
                stepper.grad_norm = optimizer_step(stepper, self.device)
        return step_scalars(out)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Trainable modules in eval mode, no gradients, autocast; training mode restored."""
        wrapped = {n: self.modules[n] for n in self.trainable}  # wrappers pass the mode down
        modes = {n: m.training for n, m in wrapped.items()}
        for module in wrapped.values():
            module.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                yield
        finally:
            for name, module in wrapped.items():
                module.train(modes[name])

    # ---- validation -----------------------------------------------------------------------
    def _validation_due(self, done: int) -> bool:
        if self.validation is None or self.val_data is None or not self.t.val_every:
            return False
        epoch, rest = divmod(done, self.iters_per_epoch)
        return rest == 0 and epoch % self.t.val_every == 0

    def validate(self) -> dict[str, float]:
        """Run the task's validation over `val_data` (collective), log `val/*` and `best/*`,
        and record the result (kept in checkpoints and val_results.json)."""
        if self.validation is None or self.val_data is None:
            raise RuntimeError("validate() needs a task with `validation` and val_data")
        with self._evaluating():
            metrics = run_validation(self.task, self.modules, self.val_data, self.device)
        done = self.progress.iteration
        epoch = done / self.iters_per_epoch
        improved = self.validation.update(metrics, epoch, done)
        row = self.validation.row(metrics)
        self.metrics.write({"step": done, "epoch": epoch, **row})
        self.wandb.log(row, step=done)
        if self.info.rank == 0:
            self.validation.write(self.output_dir)
            log.info(self.validation.summary(metrics, epoch, improved))
        return metrics

    def _final_validation_due(self) -> bool:
        """At the end of the schedule, unless that iteration was just validated. A stop at
        train.max_iters is not the end: validating there would add a result (possibly a
        'best') that an uninterrupted run never has."""
        if self.validation is None or self.val_data is None:
            return False
        done = self.progress.iteration
        last = self.validation.last
        return done == self.total_iters and (last is None or last["iteration"] != done)

    # ---- reporting ------------------------------------------------------------------------
    def _log(self, done: int, stop: int, batch: Any) -> None:
        """The log line: window means and each optimiser's lr and gradient norm (one device
        read, merged over ranks), throughput, TFLOP/s and MFU, memory, skipped samples."""
        stats = self.throughput.summary()
        local: dict[str, torch.Tensor | float] = dict(self._window.means())
        self._window = Window()
        for name, stepper in self.optimizers.items():
            suffix = "" if self._one_optimizer else f"/{name}"
            local[f"lr{suffix}"] = stepper.optimizer.param_groups[0]["lr"]
            norm = stepper.grad_norm
            local[f"grad_norm{suffix}"] = float("nan") if norm is None else norm
        record = {"step": done, "epoch": done / self.iters_per_epoch}
        record |= merge_over_ranks(read(local))
        record |= {"images_per_s": stats["images_per_s"], "data_wait": stats["data_wait"]}
        flops = self.task.flops_per_sample(batch)
        peak = getattr(self.t, "peak_tflops", None)
        world = self.info.world_size
        record |= utilization_fields(flops, stats["images_per_s"], world, self.device, peak)
        record |= {"max_mem_gb": max_memory_gb(self.device), **skipped_counts(self.data)}
        if self.info.rank == 0:
            eta = stats["step_time"] * (stop - done)
            log.info(format_progress(done, stop, eta, record))
        self.metrics.write(record)
        self.wandb.log(record, step=done)

    def _pictures(self, done: int, batch: Any) -> None:
        """Every rank runs the forward (FSDP needs all ranks); rank 0 writes the pictures,
        `vis/<name>_step<N>.png`, and logs them to wandb under `<name>`."""
        with self._evaluating():
            pictures = self.task.pictures(self.modules, batch)
        if self.info.rank != 0:
            return
        for name, picture in pictures.items():
            path = save_png(picture, self.output_dir / "vis" / f"{name}_step{done}.png")
            self.wandb.log_image(name, path, step=done)

    def _periodic(self, done: int, periodic: Periodic) -> None:
        """A task's periodic evaluation, on every rank (it may be collective), in eval mode;
        its scalars (the same on every rank) go to metrics.jsonl, wandb and the log."""
        with self._evaluating():
            row = periodic.run(self.modules)
        self.metrics.write({"step": done, "epoch": done / self.iters_per_epoch, **row})
        self.wandb.log(row, step=done)
        if self.info.rank == 0:
            log.info("iteration %d: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in row.items()))

    def _finish(self) -> None:
        """Final validation (at the schedule's end) and checkpoint, exports, closing the loggers."""
        done = self.progress.iteration
        try:
            if self._final_validation_due():  # (the last iteration's log line checked the loss)
                self.validate()
        except BaseException:
            if self._saved_at != done:  # keep the trained weights even if validation fails
                self.save()
            raise
        if self._saved_at != done:  # not when re-run after the end
            self.save()
        states = {name: self.full_state(name) for name in self.trainable}
        # Each module is exported by the first rank of its group (rank 0 for most).
        mine = {n: s for n, s in states.items() if _first_of(self.specs[n].group)}
        for path in self.task.export(mine, self.output_dir) if mine else []:
            log.info("wrote %s", path)
        self.close()

    def close(self) -> None:
        """Finish a pending asynchronous save, flush and close the loggers."""
        self.checkpoints.close()
        self.metrics.close()
        self.wandb.finish()


def cast_frozen_blocks(spec: ModuleSpec, device: torch.device, precision: str) -> int:
    """On GPUs under bf16 precision, a frozen module's blocks (`shard_units`) hold bf16
    weights (`pixio.runtime.parallel.frozen_block_dtype`), cast where the module is (CPU or
    meta device), before it is moved or materialised on the GPU. Returns the bytes per
    parameter that decide replication vs sharding."""
    dtype = frozen_block_dtype(device, precision)
    cast_blocks(spec.shard_units, dtype)
    return dtype.itemsize


def _first_of(group: dist.ProcessGroup | None) -> bool:
    """True on the first rank of `group` (None: all ranks)."""
    if not is_dist():
        return True
    return dist.get_rank(group) == 0


def _mesh_of(group: dist.ProcessGroup, device: torch.device) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device.type)


def _on_every_rank(value: Any) -> Any:
    """Rank 0's `value` on every rank (small, picklable objects only)."""
    if not is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
