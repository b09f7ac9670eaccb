"""pixio.runtime.distributed without a cluster: torchrun and SLURM environments built by hand (the
SLURM ones read through submitit), the single-process path, and real 2-process gloo groups formed
from torchrun-style and from SLURM-style variables."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from tests_helpers import free_port

from pixio.runtime import distributed
from pixio.runtime.distributed import read_dist_env

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def _foreign(key: str) -> bool:
    """A variable of the launcher this test process may itself run under."""
    return key in DIST_VARS or key.startswith(("SLURM_", "SUBMITIT_"))


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No torchrun, SLURM or submitit variables (restored after the test)."""
    for key in [k for k in os.environ if _foreign(k)]:
        monkeypatch.delenv(key)
    return monkeypatch


def slurm_step(
    monkeypatch: pytest.MonkeyPatch, procid: int = 9, job_id: str = "4321", **extra: str
) -> None:
    """The variables SLURM gives task ``procid`` of an srun step: 16 tasks, 4 per node."""
    env = dict(
        SLURM_JOB_ID=job_id,
        SLURM_STEP_ID="0",
        SLURM_PROCID=str(procid),
        SLURM_NTASKS="16",
        SLURM_LOCALID=str(procid % 4),
        SLURM_NODEID=str(procid // 4),
        SLURM_JOB_NUM_NODES="4",
        SLURM_JOB_NODELIST="gpu[003-005,9]",
    )
    for key, value in {**env, **extra}.items():
        monkeypatch.setenv(key, value)


def test_torchrun_env_wins(no_launcher) -> None:
    slurm_step(no_launcher, procid=5)
    torchrun = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="n0", MASTER_PORT="1234")
    for key, value in torchrun.items():
        no_launcher.setenv(key, value)
    got = read_dist_env()
    assert (got.rank, got.world_size, got.local_rank, got.source) == (3, 8, 1, "torchrun")
    assert (got.master_addr, got.master_port) == ("n0", 1234)


@pytest.mark.parametrize("submitit_job", [False, True], ids=["plain-srun", "submitit"])
def test_slurm_step_env(no_launcher, submitit_job: bool) -> None:
    # submitit's own JobEnvironment() needs SUBMITIT_EXECUTOR; a plain `srun python` has none.
    if submitit_job:
        no_launcher.setenv("SUBMITIT_EXECUTOR", "slurm")
    no_launcher.setenv("CUDA_VISIBLE_DEVICES", "2")  # what a one-GPU-per-task cluster sets
    slurm_step(no_launcher, procid=9)
    got = read_dist_env()
    assert (got.rank, got.world_size, got.local_rank, got.source) == (9, 16, 1, "slurm")
    assert got.master_addr == "gpu003"  # first host of gpu[003-005,9]
    assert got.master_port is not None and 20000 <= got.master_port < 30000  # not ephemeral
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"  # read only: nothing exported
    assert not any(key in os.environ for key in DIST_VARS)


def test_master_port_same_for_every_task_differs_between_jobs(no_launcher) -> None:
    def port(procid: int, job_id: str, **extra: str) -> int | None:
        slurm_step(no_launcher, procid=procid, job_id=job_id, **extra)
        return read_dist_env().master_port

    assert len({port(r, "4321") for r in range(16)}) == 1
    assert port(0, "4321") != port(0, "4322")
    # Tasks of one array share SLURM_ARRAY_JOB_ID but are separate jobs, each with its own port.
    array = dict(SLURM_ARRAY_JOB_ID="4320")
    assert port(0, "4321", SLURM_ARRAY_TASK_ID="1", **array) != port(
        0, "4322", SLURM_ARRAY_TASK_ID="2", **array
    )


def test_master_port_agrees_across_processes(no_launcher) -> None:
    # Each task computes the port in its own interpreter (another hash seed, another host).
    code = "from pixio.runtime.distributed import read_dist_env; print(read_dist_env().master_port)"
    ports = set()
    for procid, seed in ((0, "1"), (13, "2")):
        slurm_step(no_launcher, procid=procid, job_id="987654")
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        ports.add(int(out.stdout))
    assert len(ports) == 1


def test_exported_master_is_kept(no_launcher) -> None:
    slurm_step(no_launcher, procid=0, MASTER_ADDR="head", MASTER_PORT="29500")
    got = read_dist_env()
    assert (got.master_addr, got.master_port, got.source) == ("head", 29500, "slurm")


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"), ("a1,b2", "a1"), ("x[10,2]", "x10")],
)
def test_master_is_first_host_of_node_list(no_launcher, nodelist: str, first: str) -> None:
    slurm_step(no_launcher, SLURM_JOB_NODELIST=nodelist)
    assert read_dist_env().master_addr == first


def test_batch_script_is_single_process(no_launcher) -> None:
    # The sbatch script itself sees SLURM_PROCID/NTASKS but is not one of the ranks.
    slurm_step(no_launcher, procid=0)
    no_launcher.delenv("SLURM_STEP_ID")
    got = read_dist_env()
    assert (got.rank, got.world_size, got.local_rank, got.source) == (0, 1, 0, "single")
    assert (got.master_addr, got.master_port) == (None, None)


def test_single_process_without_env(no_launcher) -> None:
    assert read_dist_env() == distributed.DistEnv(0, 1, 0, None, None, "single")
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.is_main and not info.distributed
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not dist.is_initialized()  # no process group for one process
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(distributed.all_reduce_mean(t), t)
    distributed.barrier()  # no-op, must not raise
    assert distributed.is_main() and distributed.get_world_size() == 1


def test_cpu_device_on_request(no_launcher) -> None:
    # e.g. launcher.use_gpu=false on a GPU node: SLURM leaves the GPUs visible.
    assert distributed.init_distributed(device="cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        distributed.init_distributed(device="tpu")


def _run_ranks(tmp_path, rank_env: list[dict[str, str]], steps: int = 4) -> list[dict]:
    """Run fake_train.main in one process per env; returns each rank's report."""
    out = tmp_path / "run"
    code = (
        "import fake_train; from omegaconf import OmegaConf; "
        f"fake_train.main(OmegaConf.create({{'output_dir': {str(out)!r}, "
        f"'fake': {{'device': 'cpu', 'steps': {steps}, 'step_s': 0.0}}}}))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
        for env in rank_env
    ]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:  # a rank left waiting for a dead peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err
    assert json.loads((out / "done.json").read_text())["steps"] == steps
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(len(rank_env))]


def _clean_env(job_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in job_env.items() if not _foreign(k)}


def test_two_ranks_from_torchrun_vars(tmp_path, job_env) -> None:
    port = str(free_port())  # never a seeded draw: tests on other workers draw alike
    base = {**_clean_env(job_env), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    envs = [{**base, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)} for r in (0, 1)]
    reports = _run_ranks(tmp_path, envs)
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["group"] for r in reports)
    assert all(r["mean_rank"] == 0.5 for r in reports)  # the all-reduce saw both ranks


def test_two_ranks_from_slurm_vars(tmp_path, job_env) -> None:
    # What an `srun -n 2` step provides; the port is derived from the (made-up) job id.
    job_id = str(random.randint(1_000_000, 9_999_999))
    base = {**_clean_env(job_env), "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost"}
    envs = [
        {**base, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r), "SLURM_NTASKS": "2"}
        | {"SLURM_LOCALID": str(r), "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1"}
        for r in (0, 1)
    ]
    reports = _run_ranks(tmp_path, envs)
    assert [(r["rank"], r["local_rank"]) for r in reports] == [(0, 0), (1, 1)]
    assert all(r["mean_rank"] == 0.5 and r["group"] for r in reports)
