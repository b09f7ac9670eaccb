"""Process-group set-up for single-process, torchrun and SLURM (srun / submitit) runs.

Rank and world size come from, in order:

- the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``);
- the SLURM variables of an ``srun`` step (a submitit task, or a plain ``srun python -m ...``),
  read by submitit's ``TorchDistributedEnvironment``: rank ``SLURM_PROCID``, world size
  ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``, master address the first host of
  ``SLURM_JOB_NODELIST`` and a port in [20000, 30000) derived from the job id (the same for
  every task of a job, below the ephemeral range); an exported ``MASTER_ADDR`` /
  ``MASTER_PORT`` is kept. Only a step counts (``SLURM_STEP_ID`` set): the batch script has ``SLURM_PROCID`` / ``SLURM_NTASKS`` too;
- nothing: one process, no process group.

``CUDA_VISIBLE_DEVICES`` is left alone (submitit's ``export()`` would narrow it to the local
rank); the device is ``local_rank % device_count``, right whether or not the cluster binds one
GPU per task.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from submitit.helpers import TorchDistributedEnvironment
from submitit.slurm.slurm import SlurmJobEnvironment

log = logging.getLogger(__name__)

# SLURM rendez-vous ports: [20000, 30000), below the ephemeral range (32768+).
_PORT_BASE, _PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class DistInfo:
    """What ``init_distributed`` set up for this process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class _SlurmStepEnvironment(TorchDistributedEnvironment):
    """submitit's ``TorchDistributedEnvironment`` for any srun step, submitit's or a plain
    ``srun python -m ...``.

    The parent asks ``submitit.JobEnvironment()``, which picks the cluster from
    ``SUBMITIT_EXECUTOR`` and raises where only submitit's own jobs have set it; the SLURM
    variables of a step are the same whoever started it, so name submitit's SLURM environment
    directly (its node-list parsing) and keep the parent's fields; the port is ours (below).
    """

    def __init__(self) -> None:
        # The parent's body, except for the line that picks the job environment.
        self._job_env = SlurmJobEnvironment()
        self.master_addr = self._job_env.hostnames[0]
        self.master_port = self._get_master_port()  # MASTER_PORT if exported, else from job id
        self.rank = self._job_env.global_rank
        self.world_size = self._job_env.num_tasks
        self.local_rank = self._job_env.local_rank
        self.local_world_size = self._job_env.num_tasks // self._job_env.num_nodes

    def _get_master_port(self) -> int:
        """An exported MASTER_PORT, else one derived from the job id below Linux's ephemeral
        range (32768+), so it cannot clash with an outgoing connection on a busy node; array
        tasks and jobs sharing a node get different ports."""
        if "MASTER_PORT" in os.environ:
            return int(os.environ["MASTER_PORT"])
        return _PORT_BASE + zlib.crc32(str(self._job_env.job_id).encode()) % _PORT_SPAN


def read_dist_env() -> DistEnv:
    """Rank, world size and rendez-vous address from torchrun or SLURM variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
            source="torchrun",
        )
    # Only inside an srun step: the batch script itself also has SLURM_PROCID=0 and
    # SLURM_NTASKS=N, and a lone `python` there must not wait for N - 1 peers.
    if "SLURM_STEP_ID" in env and "SLURM_JOB_ID" in env:
        step = _SlurmStepEnvironment()
        return DistEnv(
            rank=step.rank,
            world_size=step.world_size,
            local_rank=step.local_rank,
            # An exported MASTER_ADDR wins (submitit would take the first host regardless).
            master_addr=env.get("MASTER_ADDR") or step.master_addr,
            master_port=step.master_port,
            source="slurm",
        )
    return DistEnv(0, 1, 0, None, None, "single")


def _device_for(local_rank: int, want: str) -> torch.device:
    """``want``: "cpu", "cuda" or "auto" (CUDA when available)."""
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {want!r}")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available")
    # Modulo: some clusters bind one GPU per task, so each task sees a single device.
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(
    backend: str | None = None, device: str = "auto", timeout_min: float = 30.0
) -> DistInfo:
    """Join the job's process group (if there is more than one process) and pick the device.

    ``device``: "auto" (CUDA when available), "cpu" (gloo, even on a GPU node: e.g. a
    ``launcher.use_gpu=false`` job, where SLURM does not hide the GPUs) or "cuda".
    ``backend``: default nccl on CUDA, gloo on CPU. Idempotent: a second call returns the
    already-initialised group's info.
    """
    env = read_dist_env()
    torch_device = _device_for(env.local_rank, device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank, torch_device)
    if env.world_size <= 1:
        return DistInfo(0, 1, env.local_rank, torch_device)
    if env.master_addr is None or env.master_port is None:
        raise RuntimeError(
            f"{env.source} run with {env.world_size} processes has no MASTER_ADDR/PORT"
        )
    # init_method="env://" reads these; SLURM runs do not have them set yet.
    os.environ.update(
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
    )
    backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_min),
    )
    log.info(
        "process group: rank %d/%d (local %d) via %s, backend %s, %s:%s",
        env.rank,
        env.world_size,
        env.local_rank,
        env.source,
        backend,
        env.master_addr,
        env.master_port,
    )
    return DistInfo(env.rank, env.world_size, env.local_rank, torch_device)


def is_dist() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks; a no-op without a process group."""
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of floating ``t`` over all ranks, as a new tensor on ``t``'s device (``t`` unchanged)."""
    if not is_dist():
        return t.detach().clone()
    out = t.detach().to(reduce_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    out /= dist.get_world_size()
    return out.to(t.device)


def reduce_device() -> torch.device:
    """Device for collective tensors: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_NODE_GROUPS: dict[int, dist.ProcessGroup | None] = {}


def node_group() -> dist.ProcessGroup | None:
    """The process subgroup of the ranks on this host (collective the first time: every rank
    must call it; cached). None without a process group. For sharding a frozen module within a
    node, where its all-gathers run over NVLink instead of the network."""
    if not is_dist():
        return None
    key = id(dist.group.WORLD)  # a new process group (tests, a second job) gets new subgroups
    if key not in _NODE_GROUPS:
        hosts: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        ranks = [[r for r, h in enumerate(hosts) if h == host] for host in dict.fromkeys(hosts)]
        _NODE_GROUPS[key], _ = dist.new_subgroups_by_enumeration(ranks)
    return _NODE_GROUPS[key]


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
