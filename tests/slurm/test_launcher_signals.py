"""The local multi-process path (`launcher.gpus>1`, torchrun) under stop signals, without a
cluster: SIGTERM to the whole process group (`timeout`, `kill -- -PGID`) reaches the launcher
and torchrun's agent; the agent passes it on to the ranks, and the launcher waits until they
have saved and exits 143 instead of dying first (under SLURM its death would end the step)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pixio.runtime import launcher

pytestmark = pytest.mark.timeout(180)


def test_torchrun_defaults_give_the_ranks_time_to_save_and_leave_user_settings(
    monkeypatch,
) -> None:
    for key in ("PET_SIGNALS_TO_HANDLE", "PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    env = launcher._torchrun_env()
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"  # torchrun's own is 30 s
    assert "SIGUSR2" in env["PET_SIGNALS_TO_HANDLE"].split(",")
    monkeypatch.setenv("PET_SHUTDOWN_TIMEOUT", "50")
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM")
    env = launcher._torchrun_env()
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in env and env["PET_SIGNALS_TO_HANDLE"] == "SIGTERM"


def test_group_sigterm_under_torchrun_lets_the_ranks_save_before_the_launcher_exits(
    tmp_path, job_env
) -> None:
    out = tmp_path / "run"
    args = ["launcher=local", "launcher.gpus=2", f"output_dir={out}", "fake.steps=3000",
            "fake.step_s=0.02"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "fake_train", *args],
        env=job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: the launcher and torchrun's agent
    )
    steps, deadline = out / "steps.txt", time.monotonic() + 120
    while not steps.exists() or len(steps.read_text().split()) < 5:
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the ranks did not start stepping:\n{proc.communicate()[0]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the launcher did not exit:\n{proc.communicate()[0]}")
    saved_when_it_exited = (out / "counter.json").exists()
    log = proc.communicate(timeout=60)[0]  # the ranks write to the same pipe
    assert code == 143, log[-4000:]
    assert saved_when_it_exited, log[-4000:]
    saved = json.loads((out / "counter.json").read_text())["step"]
    assert log.count(f"pre-empted (SIGTERM) at step {saved}: checkpoint saved") == 2, log[-4000:]
