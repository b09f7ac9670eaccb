"""Pre-emption and time-limit handling: save at a step boundary, then requeue and exit.

Signal handlers only set a flag; the trainer polls it (``requested()``, or ``agree()``, which
also shares a failed data fetch) between optimizer steps, so a checkpoint is never written in
the middle of a step. The trainer's poll is asynchronous (``start_agreement()``): the all-reduce
of the flags starts after a fetch and its result is read an iteration later, so the host never
waits for the device to agree (an iteration that waited for the device anyway, to log or save,
agrees at once). What the signals mean on SLURM (checked on
the one-node cluster of ``scripts/slurm/local_cluster.sh``):

- ``SIGUSR2``: sent to every task ``signal_delay_s`` before the time limit (``--signal=USR2@N``,
  what the submitit launcher asks for). The job has to requeue itself: under submitit, rank 0 hands
  over to submitit's own handler (resubmission pickle, ``scontrol requeue``, countdown of allowed
  time-outs); under a plain ``sbatch`` job, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``.
- ``SIGTERM``: ``scancel``, pre-emption and ``scontrol requeue`` (SLURM then restarts the job by
  itself). Save and exit only: SLURM decides whether the job comes back, and requeueing here
  would resurrect jobs that were cancelled on purpose.
- ``SIGINT`` (Ctrl-C): like SIGTERM, save at the next step and exit; a second Ctrl-C exits at
  once (``KeyboardInterrupt``), losing the work since the last checkpoint.

These signals usually reach every process of the job at once (``timeout``, ``kill -- -PGID``,
Ctrl-C, and SLURM, which signals every process of a step), data-loader workers included. A
worker that died of them would take the save down with it (PyTorch's SIGCHLD handler raises
"DataLoader worker ... is killed by signal" wherever the trainer is, the save included), so
every Pixio loader is a ``SignalSafeLoader``: its workers ignore SIGINT and SIGUSR2 and take
SIGTERM only from their own parent (PyTorch's last-resort ``terminate()``); the main process
decides. The signals are blocked while the workers start, so none can slip in before that is
set up. A worker that dies anyway (out of memory) no longer raises mid-step or mid-save: the
loader reports it at the next batch, where the trainer agrees with the other ranks on what to
do (``agree``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pixio.runtime import distributed

log = logging.getLogger(__name__)

# Exit status of a process that stopped because of a pre-emption signal (128 + SIGTERM, as the
# shell reports a process killed by SIGTERM): the run is not finished, rerun it to resume.
PREEMPTED_EXIT_CODE = 143

# Ordered by precedence: a time-limit signal (requeue) wins over a plain stop request.
_NONE, _STOP, _REQUEUE = 0, 1, 2
_KIND_OF_SIGNAL = {signal.SIGTERM: _STOP, signal.SIGINT: _STOP, signal.SIGUSR2: _REQUEUE}
DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# What a data-loader worker leaves to its main process.
WORKER_IGNORED = {signal.SIGINT, signal.SIGUSR2}


class PreemptionHandler:
    """Turns SIGUSR2 / SIGTERM / SIGINT into a flag the training loop checks between steps.

    Use as a context manager (or call ``install()`` / ``uninstall()``)::

        with PreemptionHandler() as preempt:
            for step in ...:
                train_step()
                if preempt.requested():
                    save_checkpoint()
                    preempt.requeue_and_exit()
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS):
        self.signals = signals
        self._previous: dict[signal.Signals, Any] = {}
        self._kind = _NONE
        self._received: signal.Signals | None = None
        self._agreed = _NONE
        self._interrupts = 0  # Ctrl-C presses seen

    # -- installation ------------------------------------------------------------------------
    def install(self) -> PreemptionHandler:
        """Set the flag-only handlers, remembering the previous ones (e.g. submitit's)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionHandler: not in the main thread, signals are not handled")
            return self
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were active before ``install()``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the loop acts on it at the next step boundary.
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        if _KIND_OF_SIGNAL.get(sig, _STOP) > self._kind:
            self._kind = _KIND_OF_SIGNAL.get(sig, _STOP)
            self._received = sig
        # os.write, not print: print from a handler can hit a half-done print (reentrant call).
        again = " (Ctrl-C again to exit at once, without saving)" if sig == signal.SIGINT else ""
        _write_stderr(f"[pixio] received {sig.name}: will save and stop at the next step{again}\n")

    # -- polling -----------------------------------------------------------------------------
    @property
    def received(self) -> signal.Signals | None:
        """The signal seen by this process (the strongest one if there were several)."""
        return self._received

    def requested(self) -> bool:
        """True (on every rank at once) when any rank received a signal.

        Collective when a process group exists: all ranks must call it at the same step.
        """
        return self.agree()[0]

    def agree(self, failed: bool = False) -> tuple[bool, int | None]:
        """(whether any rank received a signal, the highest rank that passed `failed=True` or
        None): every rank learns both at once, e.g. that one rank's data loader failed, so all
        can save and stop together instead of waiting for it in the next collective.

        Collective when a process group exists: all ranks must call it at the same step.
        """
        return self.start_agreement(failed).result()

    def start_agreement(self, failed: bool = False) -> Agreement:
        """Start `agree` without waiting: the all-reduce of this rank's flags (its signal as of
        now, `failed`) runs in the background; `Agreement.result()` reads it later.

        Collective when a process group exists: all ranks must start their agreements in the
        same order.
        """
        bad = distributed.get_rank() + 1 if failed else 0
        return Agreement(self, [self._kind, bad])

    # -- acting ------------------------------------------------------------------------------
    def requeue_and_exit(self, step: int | None = None, saved: bool = True) -> NoReturn:
        """After the checkpoint was saved: requeue the job if the signal asks for it, then exit.
        `saved=False`: no step was done in this run, so there was nothing to save.

        Collective: every rank calls it right after ``requested()`` returned True. Raises
        ``SystemExit(PREEMPTED_EXIT_CODE)`` on every rank.
        """
        distributed.barrier()  # every rank is past its save
        kind = self._agreed or self._kind
        action, error = "stopping", None
        if distributed.is_main() and kind == _REQUEUE:
            try:
                action = self._requeue()
            except Exception as exc:  # re-raised below, after the barrier
                action, error = f"requeue failed ({exc})", exc
        # Keep the other ranks alive until rank 0 has requeued: if they exited first, srun could
        # end the step and SLURM the job before the requeue went through.
        distributed.barrier()
        where = f" at step {step}" if step is not None else ""
        name = "SIGUSR2" if kind == _REQUEUE else (self._received or signal.SIGTERM).name
        what = "checkpoint saved" if saved else "no step to save"
        message = f"pre-empted ({name}){where}: {what}, {action}; exiting"
        # print, not log: it must reach the job's log whatever logging the trainer configured.
        print(f"[pixio] {message}", flush=True)
        distributed.cleanup()
        if error is not None:
            # e.g. submitit's UncompletedJobError after too many time-outs: it records the result.
            raise error
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def _requeue(self) -> str:
        """Requeue the job (rank 0 only); returns what was done, for the log line."""
        previous = self._previous.get(signal.SIGUSR2)
        job_id = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SUBMITIT_EXECUTOR") and callable(previous):
            # submitit's handler dumps the resubmission (our Checkpointable's checkpoint()),
            # counts time-outs against max_num_timeout, runs `scontrol requeue`, then exits.
            try:
                previous(signal.SIGUSR2, None)
            except SystemExit:
                pass
            return f"requeued job {job_id} through submitit"
        if job_id is not None:
            # A plain sbatch job (see scripts/slurm/pretrain.sbatch): requeue it ourselves.
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
            return f"requeued job {job_id}"
        return "not under SLURM, nothing to requeue"


class Agreement:
    """An all-reduce (max) of a few int32 flags, started at once and read by `result()`.

    On CUDA (NCCL) the flags go to the device, are reduced and come back into pinned host memory
    on a side stream, so `result()` waits for the collective (queued behind the collectives
    started before it) and those copies, never for the compute queued on the current stream
    (reading the device tensor there would wait for all of it). With gloo the all-reduce runs on a CPU tensor in gloo's own thread. Without a
    process group the flags are this process's own.
    """

    def __init__(self, handler: PreemptionHandler, flags: list[int]) -> None:
        self._handler = handler
        self._local: list[int] | None = flags
        self._event: Any = None
        if not distributed.is_dist():
            return
        self._local = None
        device = distributed.reduce_device()
        if device.type != "cuda":  # gloo: a CPU tensor, reduced in gloo's thread
            self._tensor = torch.tensor(flags, dtype=torch.int32)
            self._work = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, async_op=True)
            return
        # Everything on a side stream: the all-reduce waits for what that stream holds (the
        # flags' copy), not for the compute queued on the current one. Pinned memory both ways
        # and non-blocking copies: a pageable copy would make the host wait.
        stream = _side_stream(device)
        with torch.cuda.stream(stream):
            sent = torch.tensor(flags, dtype=torch.int32).pin_memory()
            self._tensor = sent.to(device, non_blocking=True)
            self._work = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, async_op=True)
            self._work.wait()  # the side stream waits for the all-reduce, not the host
            self._host = torch.empty(len(flags), dtype=torch.int32, pin_memory=True)
            self._host.copy_(self._tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def values(self) -> list[int]:
        """The reduced flags (waits for the all-reduce and, on CUDA, its copy only)."""
        if self._local is not None:
            return self._local
        if self._event is not None:
            self._event.synchronize()
            return self._host.tolist()  # pinned host memory: no device read
        self._work.wait()
        return self._tensor.tolist()  # a CPU tensor (gloo)

    def result(self) -> tuple[bool, int | None]:
        """(whether any rank had received a signal, the highest rank whose fetch failed or
        None), as of when every rank started this agreement."""
        kind, bad = self.values()
        self._handler._agreed = kind
        return kind != _NONE, bad - 1 if bad else None


_SIDE_STREAMS: dict[int, Any] = {}


def _side_stream(device: torch.device) -> Any:
    """One CUDA stream per device for the agreements' copies (created once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def wait_through_signals(child: subprocess.Popen) -> int:
    """Wait for `child` (torchrun) to end and return its status. SIGTERM, SIGINT and SIGUSR2 do
    not end this process first: under SLURM that would end the step and kill the ranks mid-save,
    in a shell it would return the prompt while they still save. The first such signal is
    passed on, once (after a signal to the whole group the child had it already; torchrun's
    agent takes a second one by restarting its wait for the ranks). A second Ctrl-C exits at
    once. A child that fails after a signal gives PREEMPTED_EXIT_CODE."""
    if threading.current_thread() is not threading.main_thread():
        return child.wait()
    seen: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in seen:
            raise KeyboardInterrupt  # the ranks still finish their save
        if not seen:
            child.send_signal(signum)
            name = signal.Signals(signum).name
            _write_stderr(f"[pixio] received {name}: waiting for the ranks to save and stop\n")
        seen.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in DEFAULT_SIGNALS}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return PREEMPTED_EXIT_CODE if seen and code != 0 else code


def _write_stderr(message: str) -> None:
    try:
        os.write(2, message.encode())
    except OSError:
        pass


# -- data-loader workers -------------------------------------------------------------------------
class SignalSafeLoader(DataLoader):
    """A `DataLoader` whose workers leave SIGTERM, SIGINT and SIGUSR2 to the main process (see
    the module doc) and run one torch thread each; the same arguments as `DataLoader`,
    `worker_init_fn` included."""

    def __init__(self, *args: Any, worker_init_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=_WorkerInit(worker_init_fn), **kwargs)

    def __iter__(self) -> Any:
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        # Workers inherit the blocked mask, so a signal sent while they start waits in the
        # kernel until `_WorkerInit` has set them up (and here, until the main process unblocks).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, *WORKER_IGNORED})
        try:
            iterator = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _defer_worker_errors()  # after PyTorch installed its SIGCHLD handler
        return iterator


class _WorkerInit:
    """`worker_init_fn` of a `SignalSafeLoader` (a class, so it pickles for spawned workers)."""

    def __init__(self, then: Any = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        # One math thread per worker, whatever the trainer's train.cpu_threads: a loader runs
        # many workers beside the trainer, each decoding its own images (PyTorch's worker loop
        # sets this too; stated here so every Pixio loader keeps it).
        torch.set_num_threads(1)
        for sig in WORKER_IGNORED:
            signal.signal(sig, signal.SIG_IGN)  # a pending one is discarded
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)
        # SIGTERM stays blocked; one thread takes it and exits only when the parent sent it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        parent = os.getppid()
        threading.Thread(target=_exit_on_parents_sigterm, args=(parent,), daemon=True).start()
        if self.then is not None:
            self.then(worker_id)


def _exit_on_parents_sigterm(parent: int) -> None:
    """In a worker: what PyTorch's own worker SIGTERM handler does for its parent's
    `terminate()` (exit at once); a SIGTERM from anyone else is dropped."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def _defer_worker_errors() -> None:
    """Wrap PyTorch's SIGCHLD handler so that a dead worker is reported on stderr instead of
    raised wherever the main process is (mid-step, mid-save). The loader still raises at the
    next batch that needs the worker (it checks its workers whenever it waits 5 s)."""
    current = signal.getsignal(signal.SIGCHLD)
    if not callable(current) or getattr(current, "_pixio_deferred", False):
        return

    def deferred(signum: int, frame: FrameType | None) -> None:
        try:
            current(signum, frame)
        except RuntimeError as err:
            _write_stderr(f"[pixio] {err} (raised at the next batch that needs it)\n")

    deferred._pixio_deferred = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, deferred)
