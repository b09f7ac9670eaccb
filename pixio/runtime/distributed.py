"""Process-group set-up for single-process, torchrun and SLURM (srun / submitit) runs.

Rank and world size come from, in order:

- the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``);
- the SLURM variables of an ``srun`` step (a submitit task, or a plain ``srun python -m ...``),
  read by submitit's ``TorchDistributedEnvironment``: rank ``SLURM_PROCID``, world size
  ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``, master address the first host of the
  step's node list (``SLURM_STEP_NODELIST``; the job's, ``SLURM_JOB_NODELIST``, when a step
  has none: a step may run on a subset of the job's nodes) and a port in [20000, 30000) from
  the job id and the step id (the same for every task of a step, another one for each step of
  a job, below the ephemeral range); an exported ``MASTER_ADDR`` / ``MASTER_PORT`` is kept.
  Only a step counts (``SLURM_STEP_ID`` set): the batch script has ``SLURM_PROCID`` /
  ``SLURM_NTASKS`` too;
- nothing: one process, no process group.

A process group exists whenever a launcher set the variables, even for one process
(``torchrun --nproc_per_node=1``): an explicit ``train.parallel=fsdp`` then runs the real FSDP
path on one GPU. Every process group the job uses is created here, at start-up, so that a
network mistake fails in the first seconds: the default group (NCCL on GPUs, created eagerly
with ``device_id``) and the gloo group of checkpoint coordination (``cpu_group``).

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
from typing import Any

import torch
import torch.distributed as dist
from submitit.helpers import TorchDistributedEnvironment
from submitit.slurm.slurm import SlurmJobEnvironment, _parse_node_list

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
        # The parent's body, except for the line that picks the job environment and the host
        # list, which is the step's (the parent reads the job's).
        self._job_env = SlurmJobEnvironment()
        self.master_addr = step_hosts()[0]
        self.master_port = self._get_master_port()  # MASTER_PORT if exported, else per step
        self.rank = self._job_env.global_rank
        self.world_size = self._job_env.num_tasks
        self.local_rank = self._job_env.local_rank
        self.local_world_size = self._job_env.num_tasks // self._job_env.num_nodes

    def _get_master_port(self) -> int:
        """An exported MASTER_PORT, else `step_port` of this job and step."""
        if "MASTER_PORT" in os.environ:
            return int(os.environ["MASTER_PORT"])
        return step_port(str(self._job_env.job_id), os.environ.get("SLURM_STEP_ID", "0"))


def step_hosts() -> list[str]:
    """Hosts of this srun step, in SLURM's order: ``SLURM_STEP_NODELIST`` (a step may run on
    a subset of the job's nodes, e.g. ``srun -N2`` in a 4-node job, whose first host may not be
    in the step at all), else ``SLURM_JOB_NODELIST``, else this host."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    return _parse_node_list(nodes) if nodes else [socket.gethostname()]


def step_port(job_id: str, step_id: str) -> int:
    """Rendez-vous port of one step, in [20000, 30000): below Linux's ephemeral range (32768+),
    so it cannot clash with an outgoing connection on a busy node. The job id's hash plus the
    step id: every task of a step agrees, and each step of a job gets its own port (two steps
    running side by side on one node, or a step started while the previous one's port is still
    in TIME_WAIT, never share one); array tasks and jobs sharing a node get different ones."""
    step = int(step_id) if step_id.isdigit() else zlib.crc32(step_id.encode())
    return _PORT_BASE + (zlib.crc32(job_id.encode()) + step) % _PORT_SPAN


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
    """Join the job's process group and pick the device; create the job's other groups.

    ``device``: "auto" (CUDA when available), "cpu" (gloo, even on a GPU node: e.g. a
    ``launcher.use_gpu=false`` job, where SLURM does not hide the GPUs) or "cuda".
    ``backend``: default nccl on CUDA, gloo on CPU. A group is created whenever a launcher set
    the variables (torchrun with one process too); a lone process has none. Idempotent: a
    second call returns the already-initialised group's info.
    """
    env = read_dist_env()
    torch_device = _device_for(env.local_rank, device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank, torch_device)
    launched = env.source == "torchrun" and None not in (env.master_addr, env.master_port)
    if env.world_size <= 1 and not launched:  # one process and nothing to meet at
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
    # device_id binds NCCL to this rank's GPU and connects eagerly: a wrong GPU binding or an
    # unreachable peer fails here, not at the first collective (barrier() guessing the device).
    bound = {"device_id": torch_device} if "nccl" in backend else {}
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_min),
        **bound,
    )
    cpu_group()  # every group at start-up: a gloo network mistake fails now, not at a save
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


_CPU_GROUP: list[Any] = [None, None]  # [the default group it belongs to, the gloo group]


def cpu_group() -> dist.ProcessGroup | None:
    """The job's gloo group for host-side coordination: checkpoint saves and resumes, also from
    the asynchronous writer's background thread (its own group: never interleaved with the
    training loop's collectives, NCCL or gloo). Created by `init_distributed` at start-up; a
    process group formed elsewhere (a test's) gets it at the first call, which is then
    collective. None without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.group.WORLD
    if _CPU_GROUP[0] is not world:  # a new default group (a second job in this process)
        _CPU_GROUP[:] = [world, dist.new_group(backend="gloo")]
    return _CPU_GROUP[1]


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
    """Destroy the process group (and its subgroups) if one exists."""
    _CPU_GROUP[:] = [None, None]
    _NODE_GROUPS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_deterministic(enabled: bool) -> None:
    """`train.deterministic`: bit-reproducible GPU kernels (CPU kernels already are), at a cost
    (docs/checkpoints.md, "What exact means"). Call it before the first cuBLAS call (the trainer
    does, in its constructor): cuBLAS reads its workspace setting once. Under strict
    deterministic mode torch runs flash and memory-efficient attention's backward in their
    deterministic mode and never picks cuDNN attention, and raises at an op that has no
    deterministic implementation, naming it. Off: nothing is changed."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a user's :16:8 is kept
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False  # autotuning may pick other kernels per run
    torch.backends.cudnn.deterministic = True
