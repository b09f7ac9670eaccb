"""pixio.runtime.distributed without a cluster: environment parsing, the single-process path, and
real 2-process gloo groups formed from torchrun-style and from SLURM-style variables."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from pixio.runtime import distributed
from pixio.runtime.distributed import first_slurm_host, read_dist_env, slurm_master_port

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID")


def test_torchrun_env_wins() -> None:
    env = {
        **dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="n0", MASTER_PORT="1234"),
        **dict(SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_NTASKS="16"),
    }
    got = read_dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.source) == (3, 8, 1, "torchrun")
    assert (got.master_addr, got.master_port) == ("n0", 1234)


def test_slurm_step_env() -> None:
    env = dict(
        SLURM_STEP_ID="0",
        SLURM_PROCID="9",
        SLURM_NTASKS="16",
        SLURM_LOCALID="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="4321",
    )
    got = read_dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.source) == (9, 16, 1, "slurm")
    assert got.master_addr == "localhost"
    assert got.master_port == slurm_master_port("4321") == 20000 + 4321


def test_slurm_explicit_master_is_kept() -> None:
    env = dict(SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="a[1-2]")
    got = read_dist_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29500"})
    assert (got.master_addr, got.master_port) == ("head", 29500)


def test_batch_script_is_single_process() -> None:
    # The sbatch script itself sees SLURM_PROCID/NTASKS but is not one of the ranks.
    got = read_dist_env(dict(SLURM_PROCID="0", SLURM_NTASKS="16", SLURM_JOB_ID="7"))
    assert (got.rank, got.world_size, got.source) == (0, 1, "single")
    assert read_dist_env({}).source == "single"


def test_master_port_is_per_job_and_unprivileged() -> None:
    ports = {slurm_master_port(str(j)) for j in range(10000)}
    assert len(ports) == 10000
    assert min(ports) >= 20000 and max(ports) < 32768  # below Linux's ephemeral range
    assert slurm_master_port("123_4") == slurm_master_port("1234")  # array task ids


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"), ("a1,b2", "a1"), ("x[10,2]", "x10")],
)
def test_first_host_without_scontrol(monkeypatch, nodelist: str, first: str) -> None:
    def no_scontrol(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(distributed.subprocess, "run", no_scontrol)
    assert first_slurm_host(nodelist) == first


def test_single_process_without_env(monkeypatch) -> None:
    for key in DIST_VARS + SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.is_main and not info.distributed
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not dist.is_initialized()  # no process group for one process
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(distributed.all_reduce_mean(t), t)
    distributed.barrier()  # no-op, must not raise
    assert distributed.is_main() and distributed.get_world_size() == 1


def test_cpu_device_on_request(monkeypatch) -> None:
    # e.g. launcher.use_gpu=false on a GPU node: SLURM leaves the GPUs visible.
    for key in DIST_VARS + SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
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
    errors = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err
    assert json.loads((out / "done.json").read_text())["steps"] == steps
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(len(rank_env))]


def _clean_env(job_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in job_env.items() if k not in DIST_VARS + SLURM_VARS}


def test_two_ranks_from_torchrun_vars(tmp_path, job_env) -> None:
    port = str(random.randint(35000, 45000))
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
        | {"SLURM_LOCALID": str(r)}
        for r in (0, 1)
    ]
    reports = _run_ranks(tmp_path, envs)
    assert [(r["rank"], r["local_rank"]) for r in reports] == [(0, 0), (1, 1)]
    assert all(r["mean_rank"] == 0.5 and r["group"] for r in reports)
