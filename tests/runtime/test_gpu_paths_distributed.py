"""GPU-cluster paths that need real process groups, checked with gloo on the CPU: a compiled DDP
head in evaluation's validation, a replicated frozen module filled from rank 0 one tensor at a
time (2 processes); the groups made at start-up and the trainer's FSDP path under one torchrun
process (1 process). Recorded-call checks without a process group: test_gpu_paths.py."""

from __future__ import annotations

import json
import os
import weakref

import pytest
import torch
import torch.distributed as dist
from tests_helpers import free_port, start_ranks
from torch import nn
from trainer_tasks import HeadTask, Regression, encoder_and_head, task_config

from pixio.runtime.distributed import DistInfo
from pixio.runtime.maploader import EvalLoader, MapLoader
from pixio.runtime.trainer import Trainer

N_TRAIN, N_VAL = 12, 11


def _join(rank: int, world: int, port: int) -> DistInfo:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    from pixio.runtime.distributed import init_distributed

    torch.set_num_threads(1)
    return init_distributed(device="cpu", timeout_min=2)  # a mismatch fails, never hangs long


# ---- 2 processes ---------------------------------------------------------------------------------
def _validate_compiled_head(rank: int) -> dict:
    """Evaluation's validation with the head the trainer hands over under train.compile=true on
    several GPUs (DDP, then torch.compile), rank 0 running twice rank 1's windows."""
    from evaluation.features import FrozenFeatures
    from evaluation.heads import LinearHead
    from evaluation.task import SegmentationTask, Windows
    from pixio.models.registry import build_encoder
    from pixio.runtime.parallel import unwrap

    torch.manual_seed(0)
    encoder = build_encoder("pixio_vitt16", img_size=32, embed_dim=32, depth=2, num_heads=2)
    features, head = FrozenFeatures(encoder, [1]), LinearHead(64, 3)
    ddp = nn.parallel.DistributedDataParallel(head)
    compiled = torch.compile(ddp, backend="eager")
    other = nn.Linear(2, 2)
    assert unwrap(compiled) is head
    assert (
        unwrap(nn.parallel.DistributedDataParallel(torch.compile(other, backend="eager"))) is other
    )
    forwards: list[int] = []
    pre_forward = ddp._pre_forward
    ddp._pre_forward = lambda *a, **k: (forwards.append(1), pre_forward(*a, **k))[1]
    task = SegmentationTask(features, head, None, Windows(16, 8, 2), num_classes=3)
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(1, 3, 32, 64, generator=g), torch.randn(1, 3, 32, 32, generator=g)]
    masks = [torch.randint(0, 3, (1, *im.shape[-2:]), generator=g) for im in images]
    head.eval()
    with torch.no_grad():
        batch = {"image": images[rank], "mask": masks[rank], "index": torch.tensor([rank])}
        stats = task.validate({"encoder": features, "head": compiled}, batch)
        summed = {k: v.sum(0) for k, v in stats.items()}
        for value in summed.values():
            dist.all_reduce(value)  # the next collective: it must pair up on both ranks
        alone = {"encoder": features, "head": head}  # every image, bare head, no collective
        rows = [task.validate(alone, {"image": im, "mask": m, "index": torch.tensor([i])})
                for i, (im, m) in enumerate(zip(images, masks, strict=True))]  # fmt: skip
    expected = {k: sum(r[k].sum(0) for r in rows) for k in summed}
    same = all(torch.equal(summed[k], expected[k]) for k in summed)
    return {"ddp_forwards": len(forwards), "sums_match": same}


def _load_replicated_frozen(rank: int) -> dict:
    """`load_full_state` into a replicated frozen module whose blocks hold bf16 (as on a GPU):
    what each broadcast carries and how much of it is alive at once."""
    from pixio.runtime.parallel import cast_blocks, load_full_state

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 64), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))

    torch.manual_seed(1)
    reference = {k: v.clone() for k, v in build().state_dict().items()}  # fp32, as on disk
    with torch.device("meta"):
        frozen = build()
    cast_blocks([frozen[1]], torch.bfloat16)
    frozen.to_empty(device="cpu")
    sent, refs, peak = [], [], [0]
    broadcast = dist.broadcast

    def tracked(tensor, src, group=None, async_op=False):
        refs.append(weakref.ref(tensor))
        peak[0] = max(peak[0], sum(t.nbytes for r in refs if (t := r()) is not None))
        sent.append(str(tensor.dtype))
        return broadcast(tensor, src, group=group, async_op=async_op)

    dist.broadcast = tracked
    try:
        state = {k: v.clone() for k, v in reference.items()} if rank == 0 else {}
        load_full_state(frozen, lambda: state)
    finally:
        dist.broadcast = broadcast
    loaded = frozen.state_dict()
    exact = all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in reference.items())
    largest = max(v.nbytes for v in reference.values())
    return {"sent": sent, "peak": peak[0], "largest_fp32": largest, "exact": exact,
            "total_fp32": sum(v.nbytes for v in reference.values())}  # fmt: skip


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    from pixio.runtime.distributed import cleanup

    _join(rank, world, port)
    result = {**_validate_compiled_head(rank), **_load_replicated_frozen(rank)}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("two_ranks")
    start_ranks(_two_rank_worker, (2, free_port(), str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_compiled_ddp_head_is_validated_bare_on_every_rank(two_ranks):
    for rank in two_ranks:
        assert rank["ddp_forwards"] == 0  # no DDP forward (buffer broadcasts) per window
        assert rank["sums_match"]  # and the reduction after it pairs up and is right


def test_replicated_frozen_module_is_filled_one_tensor_at_a_time_in_its_dtype(two_ranks):
    for rank in two_ranks:
        assert rank["exact"]
        # 6 tensors: the fp32 root's weight and bias, then the bf16 blocks' four.
        assert rank["sent"] == ["torch.float32"] * 2 + ["torch.bfloat16"] * 4
    receiver = two_ranks[1]  # what rank 1 allocated to receive: never more than one tensor
    assert receiver["peak"] <= receiver["largest_fp32"] < receiver["total_fp32"]


# ---- 1 process under torchrun ------------------------------------------------------------------
def _one_rank_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import FSDPModule

    from pixio.runtime import distributed

    info = _join(rank, 1, port)
    made: list[str] = []
    new_group = dist.new_group
    dist.new_group = lambda *a, **k: (made.append(k.get("backend")), new_group(*a, **k))[1]
    result = {
        "group": dist.is_initialized() and dist.get_world_size() == 1,
        # init_distributed made the checkpoints' gloo group: asking for it makes none
        "cpu_group_at_start": distributed.cpu_group() is not None and not made,
    }
    cfg = task_config(out, parallel="fsdp")
    trainer = _head_trainer(cfg, info)
    result |= {
        "parallel": trainer.parallel,
        "fsdp": isinstance(trainer.modules["head"], FSDPModule),
    }
    before_fit = len(made)
    trainer.fit()
    result["groups_made_after_start"] = len(made) - before_fit
    torch.save(trainer.full_state(), f"{out}/head.pt")
    with open(f"{out}/result.json", "w") as f:
        json.dump(result, f)
    distributed.cleanup()


def _head_trainer(cfg, info: DistInfo) -> Trainer:
    encoder, head = encoder_and_head()
    data = MapLoader(Regression(N_TRAIN), cfg.train.batch_size, info.rank, info.world_size, seed=0)
    val = EvalLoader(Regression(N_VAL, augment=False), 3, info.rank, info.world_size)
    return Trainer(cfg, HeadTask(encoder, head, cfg.optim), data, info, {}, val_data=val)


def test_one_torchrun_process_has_its_groups_and_runs_the_fsdp_path(tmp_path):
    out = tmp_path / "fsdp1"
    start_ranks(_one_rank_worker, (free_port(), str(out)), nprocs=1)
    result = json.loads((out / "result.json").read_text())
    assert result["group"] and result["cpu_group_at_start"]
    assert result["groups_made_after_start"] == 0  # the first save made none: all at start-up
    assert result["parallel"] == {"encoder": "none", "head": "fsdp"} and result["fsdp"]
    # The one-rank FSDP run trains what a plain single process trains.
    plain = _head_trainer(task_config(tmp_path / "plain"), DistInfo(0, 1, 0, torch.device("cpu")))
    assert plain.parallel == {"encoder": "none", "head": "none"}
    plain.fit()
    sharded = torch.load(out / "head.pt", weights_only=True)
    for name, value in plain.full_state().items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-6, atol=1e-7)
    a, b = (json.loads((d / "val_results.json").read_text()) for d in (out, tmp_path / "plain"))
    assert a["last"]["iteration"] == b["last"]["iteration"] == 18
    assert a["last"]["mse"] == pytest.approx(b["last"]["mse"], rel=1e-6)
