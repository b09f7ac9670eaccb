"""The job shell: the output_dir lock, one-line errors, writable output_dir checks."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import time

import pytest

from pixio.runtime.checkpointing import CheckpointError
from pixio.runtime.config import ConfigError
from pixio.runtime.job import (
    LOCK_NAME,
    OutputDirError,
    OutputDirLock,
    RunLockedError,
    error_line,
    prepare_output_dir,
    run_job,
)

HOLD = """
import sys, time
from pixio.runtime.job import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_lock_on_the_same_dir_is_refused_naming_the_holder(tmp_path):
    first = OutputDirLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"{tmp_path} is in use by another run") as err:
        OutputDirLock(tmp_path, wait_s=0).acquire()
    assert "pid" in str(err.value) and "host" in str(err.value)
    first.release()
    OutputDirLock(tmp_path, wait_s=0).acquire().release()  # free again once released


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError):
            OutputDirLock(tmp_path, wait_s=0).acquire()
        recorded = json.loads((tmp_path / LOCK_NAME).read_text())
        assert recorded["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lock = OutputDirLock(tmp_path, wait_s=0).acquire()  # SIGKILL released the flock
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != holder.pid
    lock.release()


def test_requeue_of_the_same_slurm_job_waits_for_the_old_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = OutputDirLock(tmp_path).acquire()  # recorded with slurm_job 4242
    start = time.monotonic()
    with pytest.raises(RunLockedError):
        OutputDirLock(tmp_path, wait_s=2.5).acquire()  # same job: retries, then gives up
    assert time.monotonic() - start >= 2.0
    first.release()


def test_prepare_output_dir_names_an_unwritable_location(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match=f"cannot write to output_dir {blocker}/run"):
        prepare_output_dir(blocker / "run")


def test_error_lines():
    assert (
        error_line(ConfigError("train.batch_size: must be positive"))
        == "train.batch_size: must be positive"
    )
    assert error_line(CheckpointError("ckpt: damaged")) == "ckpt: damaged"
    full = OSError(errno.ENOSPC, "No space left on device", "/out/metrics.jsonl")
    assert error_line(full) == "cannot write /out/metrics.jsonl: No space left on device (errno 28)"
    assert error_line(ValueError("a bug")) is None


def test_run_job_turns_known_errors_into_one_line_in_stderr_and_train_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        with run_job(tmp_path, "cpu"):
            raise CheckpointError(
                f"cannot write checkpoint {tmp_path}/checkpoint-00000004: No space left on device"
            )
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("error: cannot write checkpoint") == 1
    assert "Traceback" not in err
    assert "error: cannot write checkpoint" in (tmp_path / "train.log").read_text()
    # the lock was released on the way out
    OutputDirLock(tmp_path, wait_s=0).acquire().release()
    logging.getLogger().handlers = [
        h for h in logging.getLogger().handlers if not getattr(h, "_pixio", False)
    ]


def test_run_job_lets_bugs_raise(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_job(tmp_path, "cpu"):
            1 / 0  # noqa: B018
