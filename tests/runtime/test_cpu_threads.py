"""CPU threading of a job (pixio.runtime.threads): OpenMP's passive wait policy is in the
environment before torch loads, `train.cpu_threads` sets the job's thread count (logged in one
line, restored after), a user's OMP_NUM_THREADS / OMP_WAIT_POLICY are kept, data-loader workers
run one thread."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixio.runtime import threads
from pixio.runtime.config import ConfigError, check_cpu_threads
from pixio.runtime.launcher import _torchrun_env
from pixio.runtime.preemption import SignalSafeLoader

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
CORES = len(os.sched_getaffinity(0))


def _env(**extra: str) -> dict[str, str]:
    """This environment without OMP_* / Pixio's marker, plus `extra`."""
    drop = ("OMP_", threads.DEFAULTS_ENV, "LOCAL_WORLD_SIZE", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _run(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child process did not finish within {TIMEOUT_S} s")
    assert done.returncode == 0, done.stderr
    return done


# ---- the wait policy: set before libgomp reads it ------------------------------------------
def test_libgomp_starts_passive_when_pixio_is_imported_first() -> None:
    """libgomp prints what it read at start-up (OMP_DISPLAY_ENV): spin count 0 = passive. With
    torch imported first, it had already read the unset variable (spin count 300000)."""
    code = "import {first}, {second}; import torch; torch.ones(8) @ torch.ones(8)"
    first = _run(code.format(first="pixio", second="sys"), env=_env(OMP_DISPLAY_ENV="VERBOSE"))
    assert "GOMP_SPINCOUNT = '0'" in first.stderr
    late = _run(code.format(first="torch", second="pixio"), env=_env(OMP_DISPLAY_ENV="VERBOSE"))
    assert "GOMP_SPINCOUNT = '300000'" in late.stderr  # what Pixio's import order avoids
    mine = _run(code.format(first="pixio", second="sys"), env=_env(OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY="ACTIVE"))  # fmt: skip
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in mine.stderr  # the user's value is kept


ENTRY_POINTS = ("pretraining.train", "distillation.train", "evaluation.depth", "evaluation.semseg",
                "evaluation.knn", "evaluation.linear", "pixio.extract", "pixio.visualize",
                "pixio.convert")  # fmt: skip


@pytest.mark.parametrize("package", sorted({m.split(".")[0] for m in ENTRY_POINTS}))
def test_every_entry_point_sets_the_policy_before_torch(package: str) -> None:
    """What `python -m <package>.<module>` runs first: the package's __init__, which imports
    pixio, which sets the variable; torch is not loaded yet at that point."""
    code = f"import sys, os, {package}; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"  # fmt: skip
    assert _run(code, env=_env()).stdout.split() == ["PASSIVE", "False"]
    for module in (m for m in ENTRY_POINTS if m.startswith(f"{package}.")):
        assert (REPO / module.replace(".", "/")).with_suffix(".py").is_file(), module


def test_torchrun_children_inherit_the_policy_and_may_change_torchruns_thread_count() -> None:
    """torchrun sets OMP_NUM_THREADS=1 per rank where nobody set it: marked as not the user's,
    so the ranks' train.cpu_threads=auto decides; a user's value stays unmarked."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", threads.DEFAULTS_ENV)}
    try:
        for key in saved:
            os.environ.pop(key, None)
        env = _torchrun_env()
        assert env["OMP_WAIT_POLICY"] == os.environ["OMP_WAIT_POLICY"]
        assert "OMP_NUM_THREADS" in env[threads.DEFAULTS_ENV].split(",")
        os.environ["OMP_NUM_THREADS"] = "3"
        assert "OMP_NUM_THREADS" not in _torchrun_env().get(threads.DEFAULTS_ENV, "")
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


# ---- the thread count ----------------------------------------------------------------------
JOB = """
import json, os, sys
from pixio.runtime.job import run_job
import torch

out, settings = sys.argv[1], sys.argv[2:]
report = {"before": torch.get_num_threads(), "inside": [], "after": []}
for setting in settings:
    with run_job(out, "cpu", setting):
        report["inside"].append(torch.get_num_threads())
    report["after"].append(torch.get_num_threads())
print(json.dumps(report))
"""


def _job(tmp_path: Path, *settings: str, **env: str) -> tuple[dict, list[str]]:
    report = json.loads(_run(JOB, str(tmp_path), *settings, env=_env(**env)).stdout)
    log = (tmp_path / "train.log").read_text().splitlines()
    return report, [line for line in log if "cpu threads:" in line]


def test_a_job_runs_with_the_chosen_threads_logs_them_and_restores(tmp_path: Path) -> None:
    report, lines = _job(tmp_path, "auto", "1")
    assert report["inside"] == [CORES, 1]
    assert report["after"] == [report["before"]] * 2  # the process's own count comes back
    auto, one = lines
    assert f"cpu threads: {CORES} (train.cpu_threads=auto: {CORES} usable cores)" in auto
    assert "OMP_WAIT_POLICY=PASSIVE (pixio's default)" in auto
    assert f"({CORES} of {os.cpu_count()} cpus)" in auto
    assert "cpu threads: 1 (train.cpu_threads=1)" in one


def test_a_users_omp_variables_are_kept_and_said_so(tmp_path: Path) -> None:
    report, (line,) = _job(tmp_path, "auto", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert report["inside"] == [1]
    assert "cpu threads: 1 (OMP_NUM_THREADS=1: yours, kept)" in line
    assert "OMP_WAIT_POLICY=ACTIVE (yours, kept)" in line


def test_torchruns_default_is_not_taken_for_the_users(tmp_path: Path) -> None:
    """A rank of a Pixio-launched torchrun (OMP_NUM_THREADS=1 marked as Pixio's, one local
    rank here) gets auto's count, not torchrun's 1."""
    env = {"OMP_NUM_THREADS": "1", threads.DEFAULTS_ENV: "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
    report, (line,) = _job(tmp_path, "auto", **env)
    assert report["before"] == 1 and report["inside"] == [CORES]
    assert "train.cpu_threads=auto" in line


def test_auto_shares_the_cores() -> None:
    assert threads.auto_threads(8, {})[0] == 8
    assert threads.auto_threads(8, {"LOCAL_WORLD_SIZE": "4"})[0] == 2
    assert threads.auto_threads(2, {"LOCAL_WORLD_SIZE": "4"})[0] == 1  # never 0
    slurm = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "10", "LOCAL_WORLD_SIZE": "8"}
    assert threads.auto_threads(80, slurm)[0] == 10  # SLURM's per-task share, not 80 / 8
    assert threads.auto_threads(4, slurm)[0] == 4  # never more than the usable cores


def test_setting_is_checked_as_a_config_error() -> None:
    assert threads.parse_cpu_threads("auto") is None and threads.parse_cpu_threads(3) == 3
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(ConfigError, match=r"^train.cpu_threads: must be auto or a positive integer"):  # fmt: skip
            check_cpu_threads(bad)


def test_affinity_ranges_in_the_log_line() -> None:
    assert threads._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert threads._ranges([3]) == "3"


# ---- data-loader workers -------------------------------------------------------------------
class _Threads(torch.utils.data.Dataset):
    """Each item: the torch thread count of the process that made it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        return torch.get_num_threads()


def test_loader_workers_run_one_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a trainer with several threads
    try:
        counts = [int(n) for n in SignalSafeLoader(_Threads(), batch_size=None, num_workers=2)]
    finally:
        torch.set_num_threads(before)
    assert counts == [1, 1, 1, 1]


class _Started(Exception):
    """Raised by the stand-in run_job: the job got as far as starting."""


def test_pretraining_hands_train_cpu_threads_to_the_job(cpu_config, tmp_path, monkeypatch) -> None:
    from pretraining import train

    seen = []

    @contextlib.contextmanager
    def run_job(output_dir: str, device: str, cpu_threads: object):
        seen.append(cpu_threads)
        raise _Started
        yield

    monkeypatch.setattr(train, "run_job", run_job)
    with pytest.raises(_Started):
        train.main(cpu_config(f"data.root={tmp_path}", "train.cpu_threads=3"))
    assert seen == ["3"]
