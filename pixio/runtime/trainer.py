"""The one training loop shared by every job (pre-training, evaluation heads, distillation).

A job builds a `Task` (pixio.runtime.task: its modules, optimisers and loss) and its data, and
hands them to `Trainer.fit()`. The trainer owns everything else: placing each module (DDP or FSDP
for trainable ones, chosen per module; frozen ones replicated or sharded, bf16 on GPUs),
precision, the optimisers with their schedules, scalers and clipping, gradient accumulation,
validation with best/final tracking, logging and pictures, sharded checkpoints and exact resume,
pre-emption, and the exported artifacts at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
from pixio.runtime.config import ConfigError
from pixio.runtime.distributed import (
    DistInfo,
    all_reduce_mean,
    is_dist,
    node_group,
    reduce_device,
    set_deterministic,
)
from pixio.runtime.logging import (
    METRICS_NAME,
    RUN_ID_NAME,
    MetricsWriter,
    Throughput,
    WandbLogger,
    format_progress,
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
from pixio.runtime.preemption import PreemptionHandler
from pixio.runtime.runconfig import CONFIG_NAME, write_run_config
from pixio.runtime.task import ModuleSpec, OptimizerSpec, Periodic, StepOutput, Task
from pixio.runtime.validation import RESULTS_NAME, ValidationRecord, add_real, sum_over_ranks
from pixio.runtime.vis import save_png

log = logging.getLogger("pixio.train")

# A run's own records: a fresh start sets aside those of a run that died before its first
# checkpoint (appending to them would repeat its steps; wandb would drop the new run's).
RUN_RECORDS = (METRICS_NAME, RESULTS_NAME, CONFIG_NAME, RUN_ID_NAME)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting the last checkpoint."""


@dataclass
class Progress:
    """Where the loop is: `iteration` counts data iterations (micro-batches) done."""

    iteration: int = 0
    samples_seen: int = 0


@dataclass
class Stepper:
    """One optimiser with what belongs to it: schedule, gradient scaler, clipping, and the
    module whose parameter names key its checkpointed state."""

    optimizer: torch.optim.AdamW
    schedule: optim.Schedule
    scaler: torch.amp.GradScaler
    clip_grad: float | None
    root: nn.Module  # the one module it steps, or a ModuleDict of several (state-dict names)
    groups: list[list[nn.Parameter]]  # its parameters, per module (norms are summed over them)
    grad_norm: float = float("nan")  # pre-clip norm of the last step


@dataclass
class Window:
    """Sums of the step scalars since the last log line (logged as their means)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """bf16 / fp16 autocast dtype; None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class Trainer:
    """Runs `task` on `data` under the `train` config (optimisers: the task's `optim` nodes).

    `data` is a loader with `iterate(start_iteration)` (EpochLoader, MapLoader; optionally
    `state_dict(iteration)` / `load_state_dict`, kept per rank in checkpoints so a resume
    continues its stream exactly; `iteration` may be one less than the batches it yielded, when
    the trainer stops after a fetch), or any re-iterable of batches (one pass per epoch,
    fast-forwarded on resume). The epoch length is `train.iters_per_epoch`, or the data's `len()` when that is
    null. `val_data` (an EvalLoader: (batch, real) pairs) enables validation every
    `train.val_every` epochs and at the end, for a task with `validation` set.
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
        self.iters_per_epoch = _iters_per_epoch(self.t.iters_per_epoch, data)
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
        self._one_optimizer = (
            len({n for names in _gather(sorted(self.optimizers)) for n in names}) == 1
        )
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
            ddp = nn.parallel.DistributedDataParallel(module, ids, process_group=group)
            module = self._ddp[name] = ddp
        return torch.compile(module) if self.t.compile else module

    def _group_size(self, name: str, group: dist.ProcessGroup | None) -> int:
        """Ranks that hold module `name` (1 without a process group)."""
        if not is_dist():
            return 1
        if group is not None and dist.get_rank(group) < 0:
            raise ValueError(f"module {name!r}: rank {self.info.rank} is not in its process group")
        return dist.get_world_size(group)

    def _build_optimizers(self, specs: dict[str, OptimizerSpec]) -> dict[str, Stepper]:
        """One `Stepper` per optimiser spec; every trainable module in exactly one of them."""
        owner: dict[str, str] = {}
        for name, spec in specs.items():
            for module in spec.modules:
                if module not in self.trainable:
                    raise ValueError(f"optimiser {name!r}: {module!r} is not a trainable module")
                if module in owner:
                    raise ValueError(
                        f"module {module!r} is in optimisers {owner[module]!r} and {name!r}"
                    )
                owner[module] = name
        if orphans := sorted(set(self.trainable) - set(owner)):
            raise ValueError(f"trainable modules in no optimiser: {', '.join(orphans)}")
        return {name: self._stepper(spec) for name, spec in specs.items()}

    def _optimizer_batch(self, spec: OptimizerSpec) -> int:
        """Samples per step of one optimiser: its modules' gradients are averaged over their
        group only (a student trained on a subgroup sees that group's batch)."""
        sizes = {self._group_size(m, self.specs[m].group) for m in spec.modules}
        if len(sizes) > 1:
            raise ValueError(
                f"optimiser over {spec.modules}: its modules live on groups of sizes {sorted(sizes)}"
            )
        return self.t.batch_size * self.t.accum_iter * sizes.pop()

    def _stepper(self, spec: OptimizerSpec) -> Stepper:
        o = spec.optim
        parts = [self.trainable[m] for m in spec.modules]
        root = (
            parts[0]
            if len(parts) == 1
            else nn.ModuleDict(dict(zip(spec.modules, parts, strict=True)))
        )
        base_lr = optim.resolve_lr(o.lr, o.blr, self._optimizer_batch(spec))
        decay_all = getattr(o, "decay_all", False)  # absent from older config nodes
        optimizer = optim.build_optimizer(
            root, base_lr, o.weight_decay, tuple(o.betas), o.fused, decay_all
        )
        # A gradient scaler only for fp16: bf16 and fp32 have fp32's exponent range.
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.t.precision == "fp16")
        groups = [[p for p in part.parameters() if p.requires_grad] for part in parts]
        schedule = optim.schedule_from_config(o, base_lr, self.t.epochs)
        return Stepper(optimizer, schedule, scaler, o.clip_grad, root, groups)

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

    def _app_state(self) -> dict[str, Any]:
        """What DCP saves and loads in place: this rank's shards of every trainable module and
        optimiser, by name. Frozen modules are not saved: the job rebuilds them."""
        return {
            "model": {n: get_model_state_dict(m) for n, m in self.trainable.items()},
            "optimizer": {
                n: get_optimizer_state_dict(s.root, s.optimizer) for n, s in self.optimizers.items()
            },
        }

    def _meta(self) -> dict[str, Any]:
        """The small, plain part of a checkpoint (rank 0 writes it; weights_only-safe)."""
        return {
            "iteration": self.progress.iteration,
            "epoch": self.progress.iteration // self.iters_per_epoch,
            "samples_seen": self.progress.samples_seen,
            # Every rank's (a rank may hold optimisers the others do not), merged by name.
            "scalers": _merged(
                _gather({n: s.scaler.state_dict() for n, s in self.optimizers.items()})
            ),
            "validation": self.validation.state_dict() if self.validation else None,
            "rng": _gather(checkpointing.capture_rng_state()),
            "data": _gather(self._data_state()),
            "world_size": self.info.world_size,
            "config": self.config_dict,
        }

    def _data_state(self) -> dict[str, Any] | None:
        state_dict = getattr(self.data, "state_dict", None)
        return state_dict(self.progress.iteration) if callable(state_dict) else None

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
        for name, module in self.trainable.items():
            set_model_state_dict(module, state["model"][name])
        for name, stepper in self.optimizers.items():
            set_optimizer_state_dict(stepper.root, stepper.optimizer, state["optimizer"][name])
            if saved := (meta.get("scalers") or {}).get(name):
                stepper.scaler.load_state_dict(saved)
        if self.validation and meta.get("validation"):
            self.validation.load_state_dict(meta["validation"])
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
        if hasattr(self.data, "iterate"):  # a loader that resumes itself (EpochLoader, MapLoader)
            return zip(range(start, self.total_iters), self.data.iterate(start), strict=False)
        return self._epoch_batches(start)

    def _epoch_batches(self, start: int) -> Iterator[tuple[int, Any]]:
        """A plain re-iterable: one pass per epoch; a mid-epoch resume fast-forwards (the
        skipped batches are produced and dropped, so keep such data cheap)."""
        ipe = self.iters_per_epoch
        for epoch in range(start // ipe, self.t.epochs):
            if hasattr(self.data, "set_epoch"):
                self.data.set_epoch(epoch)
            first, done = epoch * ipe, 0
            for n, batch in enumerate(self.data):
                it = first + n
                done = n + 1
                if it >= start:
                    yield it, batch
                if done == ipe:
                    break
            if done < ipe:
                raise RuntimeError(
                    f"the data ran out after {done} batches in epoch {epoch}; an epoch is "
                    f"{ipe} iterations (train.iters_per_epoch)"
                )

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
        """Fetch, agree on stopping, step, report, until `stop`. The stop check follows the
        fetch, so that every rank hears at the same point of a fetch that failed on one of them
        (a dead data-loader worker), and runs once more after the last step."""
        batches = iter(self.batches(self.progress.iteration))
        while True:
            tick = time.perf_counter()
            item, failure = _fetch(batches) if self.progress.iteration < stop else (None, None)
            data_time = time.perf_counter() - tick
            self._stop_if_requested(failure)
            if item is None:
                return
            it, batch = item
            batch = self.task.to_device(batch, self.device)
            values = self.train_iteration(it, batch)
            samples = self.task.batch_size(batch) * self.info.world_size
            self.progress.iteration = it + 1
            self.progress.samples_seen += samples
            self.throughput.update(samples, time.perf_counter() - tick, data_time)
            self._after_iteration(it + 1, values, batch, stop)

    def _stop_if_requested(self, failure: Exception | None) -> None:
        """Collective, every iteration. When a rank got a stop signal (acted on at accumulation
        boundaries) or a rank's fetch failed, every rank saves the last completed iteration
        (exact: the data position lives in this process, and a batch fetched but not used is
        not counted) and stops: exit 143 after a signal, else the fetch's error."""
        done = self.progress.iteration
        stop, failed_rank = self.preemption.agree(failure is not None)
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

    def _after_iteration(self, done: int, values: dict[str, float], batch: Any, stop: int) -> None:
        """Logging, pictures, validation, periodic checkpoints."""
        boundary = done % self.t.accum_iter == 0
        self._window.add(values)
        if done % self.t.log_every == 0 or done == stop:
            self._log(done, stop)
        if self.t.vis_every and done % self.t.vis_every == 0:
            self._pictures(done, batch)
        for periodic in self.task.periodic():
            if done % periodic.every == 0:
                self._periodic(done, periodic)
        if self._validation_due(done):
            self.validate()
        if boundary and (done % self.t.save_every_iters == 0) and done < stop:
            self.save()

    def train_iteration(self, it: int, batch: Any) -> dict[str, float]:
        """One micro-batch: forward, backward, and at accumulation boundaries the optimiser
        steps. Returns the step's scalars: `loss` (mean over ranks) and the task's metrics."""
        accum = self.t.accum_iter
        if it % accum == 0:
            epoch = it / self.iters_per_epoch
            for stepper in self.optimizers.values():
                optim.set_lr(stepper.optimizer, stepper.schedule(epoch))
        boundary = (it + 1) % accum == 0
        with self._no_sync(not boundary):  # must cover backward, where the all-reduce happens
            with self._autocast():
                out = self.task.step(self.modules, batch)
            self._backward(out, accum)
        values = self._scalars(out)
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"loss is {values['loss']} at iteration {it}: stopping. The last good checkpoint "
                f"in {self.output_dir} is untouched; lower the lr or check the data."
            )
        if boundary:
            for stepper in self.optimizers.values():
                stepper.grad_norm = self._optimizer_step(stepper)
        return values

    def _backward(self, out: StepOutput, accum: int) -> None:
        """Backward of the loss, each optimiser's loss scaled by its own scaler under fp16."""
        if out.losses is None:
            steppers = list(self.optimizers.values())
            if len(steppers) > 1 and self.t.precision == "fp16":
                raise ValueError(
                    "fp16 with several optimisers needs StepOutput.losses (one per optimiser), "
                    "so each gradient scaler scales its own loss"
                )
            total = steppers[0].scaler.scale(out.loss)
        else:
            total = sum(self.optimizers[n].scaler.scale(loss) for n, loss in out.losses.items())
        (total / accum).backward()

    def _scalars(self, out: StepOutput) -> dict[str, float]:
        """`loss` averaged over ranks (all ranks stop together on a NaN) and this rank's task
        metrics (merged over ranks at log time: ranks may train different modules)."""
        names = ["loss", *sorted(out.metrics)]
        stacked = torch.stack(
            [out.loss.detach().float(), *(out.metrics[k].detach().float() for k in names[1:])]
        )
        values = stacked.tolist()  # one device sync for all of them
        values[0] = float(all_reduce_mean(stacked[:1]))
        return dict(zip(names, values, strict=True))

    def _optimizer_step(self, stepper: Stepper) -> float:
        """Unscale, (optionally) clip, step, zero grads; returns the pre-clip gradient norm."""
        stepper.scaler.unscale_(stepper.optimizer)
        norm = _total_grad_norm(stepper.groups)
        max_norm = stepper.clip_grad if stepper.clip_grad is not None else float("inf")
        coef = max_norm / (norm + 1e-6)  # the formula of torch.nn.utils.clip_grad_norm_
        if coef < 1.0:
            for params in stepper.groups:
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, coef)  # one kernel group, not one per tensor
        stepper.scaler.step(stepper.optimizer)
        stepper.scaler.update()
        stepper.optimizer.zero_grad(set_to_none=True)
        return norm

    def _no_sync(self, skip_sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on accumulation micro-steps."""
        # FSDP keeps syncing: each micro-step reduce-scatters into the sharded gradients, so
        # accumulation never holds an unsharded fp32 gradient (22 GB per GPU at 5B); the price
        # is one reduce-scatter per micro-step instead of one per optimiser step.
        stack = contextlib.ExitStack()
        if skip_sync:
            for ddp in self._ddp.values():
                stack.enter_context(ddp.no_sync())
        return stack

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Trainable modules in eval mode, no gradients, autocast; training mode restored."""
        wrapped = {n: self.modules[n] for n in self.trainable}  # wrappers pass the mode down
        modes = {n: m.training for n, m in wrapped.items()}
        for module in wrapped.values():
            module.eval()
        try:
            with torch.no_grad(), self._autocast():
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
        totals: dict[str, torch.Tensor] = {}
        samples = torch.zeros((), dtype=torch.float64)
        with self._evaluating():
            for batch, real in self.val_data:
                stats = self.task.validate(self.modules, self.task.to_device(batch, self.device))
                add_real(totals, stats, real)
                samples += real.sum()
        totals["samples"] = samples
        metrics = self.task.summarize(sum_over_ranks(totals))
        done = self.progress.iteration
        improved = self.validation.update(metrics, done / self.iters_per_epoch, done)
        self._report_validation(metrics, improved)
        return metrics

    def _report_validation(self, metrics: dict[str, float], improved: bool) -> None:
        record = self.validation
        done = self.progress.iteration
        best = record.best or {}
        key = record.spec.metric
        row = {f"val/{k}": v for k, v in metrics.items()}
        row |= {f"best/{key}": best.get(key), "best/epoch": best.get("epoch")}
        self.metrics.write({"step": done, "epoch": done / self.iters_per_epoch, **row})
        self.wandb.log(row, step=done)
        if self.info.rank == 0:
            record.write(self.output_dir)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            log.info(
                "validation at epoch %.4g: %s%s (best %s %.4g at epoch %.4g)",
                done / self.iters_per_epoch, shown, " [new best]" if improved else "",
                key, best.get(key, float("nan")), best.get("epoch", float("nan")),
            )  # fmt: skip

    # ---- reporting ------------------------------------------------------------------------
    def _log(self, done: int, stop: int) -> None:
        stats = self.throughput.summary()
        local = self._window.means()
        self._window = Window()
        for name, stepper in self.optimizers.items():
            suffix = "" if self._one_optimizer else f"/{name}"
            local[f"lr{suffix}"] = stepper.optimizer.param_groups[0]["lr"]
            local[f"grad_norm{suffix}"] = stepper.grad_norm
        record = {"step": done, "epoch": done / self.iters_per_epoch, **_merge_over_ranks(local)}
        record |= {
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
            if self._final_validation_due():
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

    def _final_validation_due(self) -> bool:
        """At the end of the schedule, unless that iteration was just validated. A stop at
        train.max_iters is not the end: validating there would add a result (possibly a
        'best') that an uninterrupted run never has."""
        if self.validation is None or self.val_data is None:
            return False
        done = self.progress.iteration
        last = self.validation.last
        return done == self.total_iters and (last is None or last["iteration"] != done)

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


def _fetch(batches: Iterator[tuple[int, Any]]) -> tuple[tuple[int, Any] | None, Exception | None]:
    """The next (iteration, batch), None at the end, or the error the fetch raised (a dead
    data-loader worker, a failed read) for the stop check to share with every rank."""
    try:
        return next(batches), None
    except StopIteration:
        return None, None
    except Exception as err:  # not KeyboardInterrupt: a second Ctrl-C exits at once
        return None, err


def _iters_per_epoch(configured: int | None, data: Iterable) -> int:
    """`train.iters_per_epoch`, or the length of finite data when that is null. A finite loader
    (`MapLoader`) runs its own epochs, so a configured length must equal it; a plain
    re-iterable may be cut shorter (each epoch then uses its first batches), never longer."""
    length = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    if configured is None:
        if length is None:
            raise ConfigError("train.iters_per_epoch: required for a stream (it has no length)")
        if length == 0:
            raise ConfigError("train.iters_per_epoch: the training data has no batch")
        return length
    if length is not None and (
        configured > length or hasattr(data, "iterate") and configured != length
    ):
        raise ConfigError(
            f"train.iters_per_epoch: {configured}, but the data has {length} batches per "
            "epoch (leave it null to take the data's length)"
        )
    return configured


def _merge_over_ranks(means: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the ranks that report it (collective when distributed). Values
    every rank agrees on (the loss, a shared lr) are kept exactly."""
    if not is_dist():
        return means
    reported: dict[str, list[float]] = {}
    for rank_means in _gather(means):
        for key, value in rank_means.items():
            reported.setdefault(key, []).append(value)
    merged = {}
    for key, values in reported.items():
        same = all(v == values[0] for v in values)
        merged[key] = values[0] if same else sum(values) / len(values)
    return merged


def _total_grad_norm(groups: list[list[nn.Parameter]]) -> float:
    """L2 norm of all gradients (sharded ones included) over several modules."""
    squares = 0.0
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            continue
        norm = torch.nn.utils.get_total_norm(grads)
        squares += float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) ** 2
    return math.sqrt(squares)


def _merged(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict of every rank's entries (the first rank's value for a name several hold)."""
    out: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            out.setdefault(key, value)
    return out


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
