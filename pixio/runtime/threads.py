"""CPU threading of a Pixio process: OpenMP's wait policy and torch's thread count.

Torch's CPU kernels run on an OpenMP team (GNU libgomp in the pip wheels). With no wait policy
set, libgomp's idle threads spin (`GOMP_SPINCOUNT` 300000) before they sleep; on a CPU shared
with other processes a spinning thread holds the core that the thread it waits for needs, and
a run slows down several times (docs/performance.md, "CPU threads"). A passive policy (spin
count 0) sleeps at once and costs nothing measurable on idle cores.

libgomp reads `OMP_WAIT_POLICY` once, when torch loads it (`import torch`), so `pixio/__init__.py`
calls `default_wait_policy()` before anything imports torch, and the packages `pretraining`,
`distillation` and `evaluation` import `pixio` first: every `python -m` entry point, torchrun's
and SLURM's children (which also inherit the variable) start passive. A value the user set is
kept (`os.environ.setdefault`); `PIXIO_OMP_DEFAULTS` lists the variables Pixio set, so a child
process knows they are not the user's.

`choose_threads` / `cpu_threads` then set torch's thread count for the job from
`train.cpu_threads` (`run_job` does, and logs the one line `ThreadChoice.describe()` returns).
Data-loader workers run one thread each (`pixio.runtime.preemption.SignalSafeLoader`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
NUM_THREADS_ENV = "OMP_NUM_THREADS"
DEFAULTS_ENV = "PIXIO_OMP_DEFAULTS"  # comma-separated OMP_* names Pixio (not the user) set
PASSIVE = "PASSIVE"
AUTO = "auto"


@dataclass(frozen=True)
class _Start:
    """What the process looked like when `pixio` was first imported."""

    torch_first: bool  # torch (and so libgomp) was loaded before pixio
    policy: str | None  # OMP_WAIT_POLICY in the environment then (None: unset)


_start: _Start | None = None


def pixio_defaults() -> set[str]:
    """The OMP_* variables of this environment that Pixio set (here or in a parent process)."""
    return {n for n in os.environ.get(DEFAULTS_ENV, "").split(",") if n}


def mark_default(name: str, env: dict[str, str] | None = None) -> None:
    """Record in `env` (default: os.environ) that Pixio, not the user, chose `name`."""
    env = os.environ if env is None else env
    names = {n for n in env.get(DEFAULTS_ENV, "").split(",") if n} | {name}
    env[DEFAULTS_ENV] = ",".join(sorted(names))


def default_wait_policy() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless the environment has one; remember whether torch was
    already loaded (then libgomp has read the environment before this). Runs once per process."""
    global _start
    if _start is not None:
        return
    _start = _Start("torch" in sys.modules, os.environ.get(WAIT_POLICY_ENV))
    if WAIT_POLICY_ENV not in os.environ:
        os.environ[WAIT_POLICY_ENV] = PASSIVE
        mark_default(WAIT_POLICY_ENV)


def parse_cpu_threads(value: object) -> int | None:
    """`train.cpu_threads` as a count (None for auto); ValueError for anything else."""
    text = str(value).strip().lower()
    if text == AUTO:
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"must be auto or a positive integer, got {value!r}")


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity: taskset, cgroup cpusets, SLURM)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def auto_threads(cores: int, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(threads, why) for `train.cpu_threads=auto`: the usable cores, capped by SLURM's
    `--cpus-per-task`, shared by the ranks torchrun started on this machine."""
    env = os.environ if env is None else env
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit() and "SLURM_JOB_ID" in env:
        per_task = int(env["SLURM_CPUS_PER_TASK"])
        return max(1, min(cores, per_task)), f"{cores} usable cores, SLURM cpus-per-task {per_task}"  # fmt: skip
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        return max(1, cores // local), f"{cores} usable cores / {local} local ranks"
    return cores, f"{cores} usable cores"


@dataclass(frozen=True)
class ThreadChoice:
    """What a job runs with; `threads` None: torch's count is left as it is."""

    threads: int | None
    why: str
    policy: str
    cores: list[int]

    def describe(self) -> str:
        """The one log line: threads, wait policy, affinity."""
        import torch

        return (
            f"cpu threads: {torch.get_num_threads()} ({self.why}); {self.policy}; "
            f"affinity: {_ranges(self.cores)} ({len(self.cores)} of {os.cpu_count()} cpus)"
        )


def choose_threads(setting: object = AUTO) -> ThreadChoice:
    """The thread count for `train.cpu_threads` (`setting`), see docs/performance.md:
    an integer wins; auto keeps a user's OMP_NUM_THREADS, keeps torch's count in a process that
    loaded torch before Pixio could make OpenMP passive (a notebook, a test runner: the host
    process decides), else `auto_threads`."""
    count, cores = parse_cpu_threads(setting), usable_cores()
    user_threads = os.environ.get(NUM_THREADS_ENV) if NUM_THREADS_ENV not in pixio_defaults() else None  # fmt: skip
    if count is not None:
        over = f", over OMP_NUM_THREADS={user_threads}" if user_threads else ""
        return ThreadChoice(count, f"train.cpu_threads={count}{over}", wait_policy(), cores)
    if user_threads:
        return ThreadChoice(None, f"OMP_NUM_THREADS={user_threads}: yours, kept", wait_policy(), cores)  # fmt: skip
    if not policy_in_effect():
        return ThreadChoice(None, "torch's own count: torch was loaded before pixio, with OpenMP's default wait policy", wait_policy(), cores)  # fmt: skip
    threads, why = auto_threads(len(cores))
    return ThreadChoice(threads, f"train.cpu_threads=auto: {why}", wait_policy(), cores)


def policy_in_effect() -> bool:
    """Whether libgomp started with an OMP_WAIT_POLICY (Pixio's or the user's)."""
    return _start is None or not _start.torch_first or _start.policy is not None


def wait_policy() -> str:
    """OMP_WAIT_POLICY as this process's OpenMP runs it, and whose choice it is."""
    value = os.environ.get(WAIT_POLICY_ENV)
    if not policy_in_effect():
        return "OMP_WAIT_POLICY: OpenMP's default (spins; torch was loaded before pixio)"
    if value is None:
        return "OMP_WAIT_POLICY: unset"
    whose = "pixio's default" if WAIT_POLICY_ENV in pixio_defaults() else "yours, kept"
    return f"OMP_WAIT_POLICY={value} ({whose})"


@contextlib.contextmanager
def cpu_threads(setting: object = AUTO) -> Iterator[ThreadChoice]:
    """torch's thread count as `choose_threads` says, for the block; the process's own after."""
    import torch

    choice, before = choose_threads(setting), torch.get_num_threads()
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    for cpu in cpus:
        if out and cpu == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{cpu}"
        else:
            out.append(str(cpu))
    return ",".join(out)
