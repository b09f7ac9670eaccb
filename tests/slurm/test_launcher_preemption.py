"""PreemptionHandler without a cluster: flag-only handlers, what requeue_and_exit does in each
environment, and two ranks agreeing on the stop step when only one of them got the signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tests_helpers import free_port

from pixio.runtime import preemption
from pixio.runtime.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler


@pytest.fixture
def calls(monkeypatch) -> list[list[str]]:
    """Commands the handler runs (recorded, not executed), outside any SLURM job."""
    recorded: list[list[str]] = []
    monkeypatch.setattr(preemption.subprocess, "run", lambda cmd, **kw: recorded.append(cmd))
    for key in ("SLURM_JOB_ID", "SUBMITIT_EXECUTOR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    return recorded


def _raise(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # let the interpreter run the Python-level handler


def test_handlers_only_flag_and_are_restored() -> None:
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        with PreemptionHandler() as handler:
            assert not handler.requested()
            _raise(signal.SIGUSR2)
            assert handler.requested() and handler.received == signal.SIGUSR2
            assert seen == []  # the previous handler is not run by the signal itself
        _raise(signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]  # restored on exit
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_outside_slurm_stops_without_requeue(calls) -> None:
    with PreemptionHandler() as handler:
        _raise(signal.SIGUSR2)
        assert handler.requested()
        with pytest.raises(SystemExit) as exit_info:
            handler.requeue_and_exit(step=7)
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert calls == []


def test_plain_slurm_time_limit_requeues_the_job(calls, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with PreemptionHandler() as handler:
        _raise(signal.SIGUSR2)
        assert handler.requested()
        with pytest.raises(SystemExit):
            handler.requeue_and_exit(step=3)
    assert calls == [["scontrol", "requeue", "4242"]]
    assert (
        "pre-empted (SIGUSR2) at step 3: checkpoint saved, requeued job 4242"
        in capsys.readouterr().out
    )


def test_sigterm_never_requeues(calls, monkeypatch) -> None:
    # scancel / pre-emption / `scontrol requeue`: SLURM decides whether the job comes back.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with PreemptionHandler() as handler:
        _raise(signal.SIGTERM)
        assert handler.requested() and handler.received == signal.SIGTERM
        with pytest.raises(SystemExit):
            handler.requeue_and_exit()
    assert calls == []


def test_time_limit_signal_wins_over_sigterm(calls, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    with PreemptionHandler() as handler:
        _raise(signal.SIGUSR2)
        _raise(signal.SIGTERM)  # e.g. SLURM's own kill after our requeue
        assert handler.requested() and handler.received == signal.SIGUSR2
        with pytest.raises(SystemExit):
            handler.requeue_and_exit()
    assert calls == [["scontrol", "requeue", "5"]]


class FakeSubmititHandler:
    """Stands in for submitit's SignalHandler.checkpoint_and_try_requeue."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[int] = []
        self.error = error

    def __call__(self, signum: int, frame: object) -> None:
        self.calls.append(signum)
        if self.error is not None:
            raise self.error
        raise SystemExit(-1)  # what submitit does after `scontrol requeue`


def test_submitit_handler_is_chained_once(calls, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    fake = FakeSubmititHandler()
    before = signal.signal(signal.SIGUSR2, fake)
    try:
        with PreemptionHandler() as handler:
            _raise(signal.SIGUSR2)
            _raise(signal.SIGUSR2)  # a second signal is still one event
            assert fake.calls == []  # not at signal time: only at the step boundary
            assert handler.requested()
            with pytest.raises(SystemExit) as exit_info:
                handler.requeue_and_exit()
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert fake.calls == [signal.SIGUSR2]
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert calls == []  # submitit requeues, not us


def test_submitit_refusal_propagates(calls, monkeypatch) -> None:
    # Too many time-outs: submitit raises to record the job as uncompleted; keep that error.
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    fake = FakeSubmititHandler(RuntimeError("timed-out too many times"))
    before = signal.signal(signal.SIGUSR2, fake)
    try:
        with PreemptionHandler() as handler:
            _raise(signal.SIGUSR2)
            assert handler.requested()
            with pytest.raises(RuntimeError, match="too many"):
                handler.requeue_and_exit()
    finally:
        signal.signal(signal.SIGUSR2, before)


def _start_ranks(out, job_env: dict[str, str], steps: int, step_s: float) -> list[subprocess.Popen]:
    port = str(free_port())  # never a seeded draw: tests on other workers draw alike
    code = (
        "import fake_train; from omegaconf import OmegaConf; "
        f"fake_train.main(OmegaConf.create({{'output_dir': {str(out)!r}, "
        f"'fake': {{'device': 'cpu', 'steps': {steps}, 'step_s': {step_s}}}}}))"
    )
    base = {**job_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SUBMITIT_EXECUTOR"):
        base.pop(key, None)
    return [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**base, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]


def test_two_ranks_stop_at_the_same_step_and_resume(tmp_path, job_env) -> None:
    out = tmp_path / "run"
    steps = 400
    procs = _start_ranks(out, job_env, steps, step_s=0.01)
    deadline = time.time() + 60
    while not (out / "steps.txt").exists() or len((out / "steps.txt").read_text().split()) < 5:
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[0]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told
    logs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2, logs
    saved = json.loads((out / "counter.json").read_text())["step"]
    assert 5 <= saved < steps
    for log in logs:  # both ranks left at the step rank 0 saved
        assert f"pre-empted (SIGTERM) at step {saved}: checkpoint saved, stopping" in log
    done_steps = (out / "steps.txt").read_text().split()
    assert done_steps == [str(i) for i in range(saved)]

    # Re-running resumes from the saved counter and runs each remaining step exactly once.
    procs = _start_ranks(out, job_env, steps, step_s=0.0)
    logs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert json.loads((out / "done.json").read_text()) == {"steps": steps, "start": saved}
    assert (out / "steps.txt").read_text().split() == [str(i) for i in range(steps)]


def test_ctrl_c_saves_like_sigterm_and_a_second_one_exits_at_once(calls, capfd) -> None:
    with PreemptionHandler() as handler:
        _raise(signal.SIGINT)  # no KeyboardInterrupt: only a flag
        assert handler.requested() and handler.received == signal.SIGINT
        assert "Ctrl-C again to exit at once" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            _raise(signal.SIGINT)
        with pytest.raises(SystemExit) as exit_info:
            handler.requeue_and_exit(step=3)
    assert exit_info.value.code == PREEMPTED_EXIT_CODE and calls == []
    assert "pre-empted (SIGINT) at step 3" in capfd.readouterr().out
