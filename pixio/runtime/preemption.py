"""Pre-emption and time-limit handling: save at a step boundary, then requeue and exit.

Signal handlers only set a flag; the trainer polls ``requested()`` between optimizer steps, so a
checkpoint is never written in the middle of a step. What the signals mean on SLURM (checked on
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

from pixio.runtime import distributed

log = logging.getLogger(__name__)

# Exit status of a process that stopped because of a pre-emption signal (128 + SIGTERM, as the
# shell reports a process killed by SIGTERM): the run is not finished, rerun it to resume.
PREEMPTED_EXIT_CODE = 143

# Ordered by precedence: a time-limit signal (requeue) wins over a plain stop request.
_NONE, _STOP, _REQUEUE = 0, 1, 2
_KIND_OF_SIGNAL = {signal.SIGTERM: _STOP, signal.SIGINT: _STOP, signal.SIGUSR2: _REQUEUE}
DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


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
        kind = self._kind
        if distributed.is_dist():
            flag = torch.tensor([kind], dtype=torch.int32, device=distributed.reduce_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            kind = int(flag.item())
        self._agreed = kind
        return kind != _NONE

    # -- acting ------------------------------------------------------------------------------
    def requeue_and_exit(self, step: int | None = None) -> NoReturn:
        """After the checkpoint was saved: requeue the job if the signal asks for it, then exit.

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
        message = f"pre-empted ({name}){where}: checkpoint saved, {action}; exiting"
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


def _write_stderr(message: str) -> None:
    try:
        os.write(2, message.encode())
    except OSError:
        pass
