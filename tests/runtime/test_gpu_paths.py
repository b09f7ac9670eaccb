"""Paths that only differ on GPUs, NCCL and SLURM nodes, checked on the CPU: `torch.cuda` and
`torch.distributed` functions are replaced by recorders, the SLURM variables are set by hand, and
the meta device stands in for a GPU's memory. Process groups of their own: test_gpu_paths_distributed.py."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from trainer_tasks import HeadTask, Regression, encoder_and_head, task_config

from pixio.runtime import checkpointing, distributed, rng
from pixio.runtime.checkpointing import CheckpointManager
from pixio.runtime.distributed import DistInfo
from pixio.runtime.maploader import MapLoader
from pixio.runtime.parallel import choose_parallel
from pixio.runtime.trainer import Trainer

CUDA = torch.device("cuda", 3)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """A process whose CUDA is initialised on device 3 (the rank's, set by init_distributed):
    `set_device` calls are recorded with their thread; a CUDA stream or an all-device RNG read
    raises (no driver here, and neither may happen)."""
    calls: list[tuple] = []

    def refused(what: str):
        def call(*args, **kwargs):
            calls.append((what, threading.current_thread().name))
            raise RuntimeError(f"{what} must not be used")

        return call

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: CUDA.index)
    monkeypatch.setattr(cuda, "device_count", lambda: 8)
    record = lambda d: calls.append(("set_device", threading.current_thread().name, d))  # noqa: E731
    monkeypatch.setattr(cuda, "set_device", record)
    monkeypatch.setattr(cuda, "current_stream", refused("current_stream"))
    monkeypatch.setattr(cuda, "get_rng_state_all", refused("get_rng_state_all"))
    return calls


# ---- 1. the asynchronous checkpoint writer -----------------------------------------------------
def test_async_write_thread_runs_on_the_ranks_device_without_a_cuda_stream(tmp_path, fake_gpu):
    manager = CheckpointManager(tmp_path, async_save=True)
    state = {"model": {"w": torch.arange(6.0), "b": torch.ones(2, 3)}}
    manager.save(1, state, {"iteration": 1})
    state["model"]["w"] += 100  # after save returned: not in the checkpoint
    manager.close()
    # The writer thread bound itself to device 3 once; nothing asked for a CUDA stream.
    assert fake_gpu == [("set_device", "pixio-ckpt_0", CUDA.index)]
    saved = checkpointing.load_checkpoint(tmp_path / "checkpoint-00000001")["model"]
    assert torch.equal(saved["w"], torch.arange(6.0)) and torch.equal(saved["b"], torch.ones(2, 3))


def test_host_state_is_written_without_a_cuda_stream_on_a_gpu_node(tmp_path, fake_gpu):
    # A CPU run on a GPU node (launcher.use_gpu=false) saves synchronously from the main thread.
    CheckpointManager(tmp_path).save(2, {"model": {"w": torch.arange(4.0)}}, {"iteration": 2})
    assert fake_gpu == []
    saved = checkpointing.load_checkpoint(tmp_path / "checkpoint-00000002")["model"]
    assert torch.equal(saved["w"], torch.arange(4.0))


# ---- 4. SLURM rendez-vous -----------------------------------------------------------------------
@pytest.fixture
def slurm_step(monkeypatch: pytest.MonkeyPatch):
    """Set the variables of task `procid` of step `step` of job 4321, which holds 4 nodes."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)

    def set_step(procid: int = 0, step: str = "0", **extra: str) -> distributed.DistEnv:
        env = dict(SLURM_JOB_ID="4321", SLURM_STEP_ID=step, SLURM_PROCID=str(procid),
                   SLURM_NTASKS="12", SLURM_LOCALID=str(procid % 4), SLURM_NODEID=str(procid // 4),
                   SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu[001-002,003-004]")  # fmt: skip
        for key, value in {**env, **extra}.items():
            monkeypatch.setenv(key, value)
        return distributed.read_dist_env()

    return set_step


def test_master_is_the_first_host_of_the_steps_node_list(slurm_step, monkeypatch):
    # `srun -N3` in a 4-node job: the step runs on gpu003, gpu004 and gpu010 only.
    got = slurm_step(procid=5, SLURM_STEP_NODELIST="gpu[003-004,010]")
    assert (got.master_addr, got.rank, got.world_size, got.source) == ("gpu003", 5, 12, "slurm")
    assert distributed.step_hosts() == ["gpu003", "gpu004", "gpu010"]
    # Without a step list (an older SLURM, a hand-made environment): the job's.
    monkeypatch.delenv("SLURM_STEP_NODELIST")
    assert slurm_step(procid=5).master_addr == "gpu001"


def test_every_task_of_a_step_agrees_on_a_port_that_differs_per_step(slurm_step):
    ports = {step: {slurm_step(r, step).master_port for r in range(12)} for step in ("0", "1", "2")}
    assert all(len(p) == 1 for p in ports.values())  # one port per step, whatever the task
    first = {step: p.pop() for step, p in ports.items()}
    assert len(set(first.values())) == 3  # every step its own
    assert all(20000 <= p < 30000 for p in first.values())  # below the ephemeral range
    assert first["1"] == distributed.step_port("4321", "1")
    assert distributed.step_port("4321", "0") != distributed.step_port("4322", "0")


# ---- 5. NCCL's device binding -------------------------------------------------------------------
def test_nccl_process_group_is_bound_to_the_ranks_gpu(monkeypatch, fake_gpu):
    torchrun = dict(
        RANK="9", WORLD_SIZE="16", LOCAL_RANK="1", MASTER_ADDR="n0", MASTER_PORT="29500"
    )
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    inits: list[dict] = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: inits.append(kw))
    info = distributed.init_distributed(device="cuda")
    assert info.device == torch.device("cuda", 1) and (info.rank, info.world_size) == (9, 16)
    (kwargs,) = inits
    assert kwargs["backend"] == "nccl" and kwargs["device_id"] == torch.device("cuda", 1)
    assert ("set_device", "MainThread", torch.device("cuda", 1)) in fake_gpu
    inits.clear()
    distributed.init_distributed(device="cpu")  # gloo: no device to bind
    assert inits[0]["backend"] == "gloo" and "device_id" not in inits[0]


# ---- 6. CUDA random generator states ------------------------------------------------------------
def test_cuda_rng_state_is_the_ranks_device_only_and_old_checkpoints_restore(monkeypatch, fake_gpu):
    read, written = [], []

    def get_rng_state(device):
        read.append(device)
        return torch.full((16,), 7, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: written.append((s.clone(), d)))
    state = rng.capture_rng_state()
    assert read == [CUDA.index] and torch.equal(
        state["cuda_device"], torch.full((16,), 7, dtype=torch.uint8)
    )
    assert "cuda" not in state
    rng.restore_rng_state(state)
    assert [(int(s[0]), d) for s, d in written] == [(7, CUDA.index)]
    # A checkpoint of the older format holds every device of the node: device 3's is restored.
    written.clear()
    old = {k: v for k, v in state.items() if k != "cuda_device"}
    old["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    rng.restore_rng_state(old)
    assert [(int(s[0]), d) for s, d in written] == [(3, CUDA.index)]
    assert ("get_rng_state_all", "MainThread") not in fake_gpu


# ---- 8. train.deterministic ---------------------------------------------------------------------
class _Recording(HeadTask):
    """The trainer's test task, noting the deterministic setting inside each step."""

    seen: list[bool] = []

    def step(self, modules, batch):
        self.seen.append(torch.are_deterministic_algorithms_enabled())
        return super().step(modules, batch)


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)  # fmt: skip
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("deterministic", [False, True])
def test_train_deterministic_is_applied_inside_the_run(
    tmp_path, restore_determinism, deterministic
):
    torch.backends.cudnn.benchmark = True  # what a user's earlier code may have left
    cfg = task_config(tmp_path / "run", epochs=1, deterministic=deterministic)
    encoder, head = encoder_and_head()
    task = _Recording(encoder, head, cfg.optim)
    _Recording.seen = []
    data = MapLoader(Regression(8), cfg.train.batch_size, seed=0)
    single = DistInfo(0, 1, 0, torch.device("cpu"))
    Trainer(cfg, task, data, single, {}).fit()
    assert _Recording.seen == [deterministic] * 4  # 8 samples, batch 2
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") == deterministic
    assert torch.backends.cudnn.benchmark != deterministic


# ---- 7. frozen encoders reach the GPU in bf16 ---------------------------------------------------
@pytest.fixture
def meta_to_cpu(monkeypatch):
    """`to_empty(device=cuda)` records each parameter's dtype at the call, then allocates on
    the CPU: what the GPU would have received."""
    seen: dict[str, torch.dtype] = {}
    original = nn.Module.to_empty

    def to_empty(module, *, device, recurse=True):
        seen.update({n: p.dtype for n, p in module.named_parameters()})
        assert torch.device(device).type == "cuda"
        return original(module, device="cpu", recurse=recurse)

    monkeypatch.setattr(nn.Module, "to_empty", to_empty)
    return seen


def test_evaluation_encoder_is_allocated_on_the_gpu_in_bf16(tmp_path, meta_to_cpu, tiny_encoder):
    from evaluation.features import EncoderConfig, load_frozen_encoder
    from pixio.checkpoint import save_encoder

    path = save_encoder(tiny_encoder, tmp_path / "enc.safetensors", "pixio_vitt16")
    cfg = OmegaConf.structured(EncoderConfig(name="pixio_vitt16", checkpoint=str(path)))
    encoder = load_frozen_encoder(cfg, torch.device("cuda", 0), "bf16")
    blocks = {n for n in meta_to_cpu if n.startswith("blocks.")}
    assert blocks and all(meta_to_cpu[n] == torch.bfloat16 for n in blocks)  # before the move
    assert all(meta_to_cpu[n] == torch.float32 for n in set(meta_to_cpu) - blocks)  # the root
    reference = tiny_encoder.state_dict()
    for name, value in encoder.state_dict().items():  # the checkpoint's values, cast once
        assert torch.equal(value, reference[name].to(value.dtype)), name
    meta_to_cpu.clear()
    load_frozen_encoder(cfg, torch.device("cuda", 0), "fp32")  # fp32 runs keep fp32 blocks
    assert set(meta_to_cpu.values()) == {torch.float32}


def test_trainer_places_a_meta_built_frozen_module_in_bf16(tmp_path, meta_to_cpu):
    from pixio.runtime.task import ModuleSpec

    with torch.device("meta"):
        frozen = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    spec = ModuleSpec(frozen, trainable=False, shard_units=[frozen[1]], load=lambda m: None)
    trainer = Trainer.__new__(Trainer)  # the placement alone, as the constructor calls it
    trainer.t = task_config(tmp_path, precision="bf16", compile="false").train
    trainer.device, trainer.has_checkpoints, trainer.parallel, trainer._ddp = CUDA, False, {}, {}
    trainer._place("teacher", spec)
    assert trainer.parallel == {"teacher": "none"}
    assert meta_to_cpu == {"0.weight": torch.float32, "0.bias": torch.float32,
                           **{f"1.{i}.{p}": torch.bfloat16 for i in (0, 1) for p in ("weight", "bias")}}  # fmt: skip


# ---- 9. k-NN feature gather ---------------------------------------------------------------------
def test_knn_gather_keeps_rank0_buffer_at_rows_whatever_the_world_size(monkeypatch):
    from evaluation import knn_job as knn

    world, m, d, rows = 64, 10, 3, 128
    local = torch.arange(m * d, dtype=torch.float32).reshape(m, d)
    received: list[int] = []

    def gather(piece, bucket, dst):  # rank r's rows are rank 0's + 1000 r
        assert dst == 0
        received.append(sum(t.numel() * t.element_size() for t in bucket))
        for r, t in enumerate(bucket):
            t.copy_(piece)
            t[:, :-1] += 1000 * r

    monkeypatch.setattr(knn, "is_dist", lambda: True)
    monkeypatch.setattr(knn.dist, "gather", gather)
    info = DistInfo(0, world, 0, torch.device("cpu"))
    out = knn.gather_positions(local, torch.ones(m), world * m, info, rows=rows)
    assert max(received) <= rows * (d + 1) * 4  # 64 ranks x 2 rows x (D + 1) floats
    expected = torch.stack([local + 1000 * r for r in range(world)], dim=1).reshape(-1, d)
    assert torch.equal(out, expected)  # position j * W + r = rank r's row j


# ---- 10. an explicit choice under a one-rank group ----------------------------------------------
def test_explicit_parallel_is_kept_under_a_one_rank_group(monkeypatch):
    assert choose_parallel("fsdp", 10, 1) == "none"  # no process group: plain
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert choose_parallel("fsdp", 10, 1) == "fsdp"
    assert choose_parallel("ddp", 10, 1) == "ddp"
    assert choose_parallel("auto", 10**10, 1) == "none"  # auto: nothing to shard on one rank
    assert choose_parallel("fsdp", 10, 1, trainable=False) == "fsdp"
