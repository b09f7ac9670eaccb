"""Two gloo processes with FSDP2 on CPU: sharded saves (each rank its own file, sync and async
while the default group keeps working), loaded by one process, and a one-process checkpoint
loaded by two (resharding), with both ranks falling back to the same older checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tests_helpers import free_port, start_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pixio.runtime import checkpointing as ckpt

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny model (5 output rows: an uneven split over 2 ranks) and its AdamW."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 5))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)  # the same batch on every rank
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _clone(tree):
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree.clone() if isinstance(tree, torch.Tensor) else tree


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Unsharded copy of the model and optimiser state (all ranks take part; rank 0 has it)."""
    options = FULL if dist.is_initialized() else None
    return _clone({
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, opt, options=options).get("state", {}),
    })  # fmt: skip


def assert_full_equal(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optim"].keys() == b["optim"].keys()
    for fqn, entry in a["optim"].items():
        for k, v in entry.items():
            assert torch.equal(v, b["optim"][fqn][k]), (fqn, k)


# ---- what each rank runs ----------------------------------------------------------------------
def _sharded(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    model, _ = build(seed)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _save_run(out: str, result: str) -> None:
    """Sync save at step 1, async save at step 2 with training collectives meanwhile."""
    model, opt = _sharded(0)
    rank, refs = dist.get_rank(), {}
    manager = ckpt.CheckpointManager(out, async_save=False)
    for it in (1, 2):
        step(model, opt, it)
        manager.async_save = it == 2
        states = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}  # fmt: skip
        rng: list = [None, None]
        dist.all_gather_object(rng, ckpt.capture_rng_state())
        manager.save(it, states, {"iteration": it, "rng": rng})
        for _ in range(3):  # the default group stays usable during the background write
            dist.all_reduce(torch.ones(1))
        refs[it] = full_state(model, opt)
    manager.close()
    if rank == 0:
        torch.save(refs, result)


def load_into(out, model: nn.Module, opt) -> tuple[Path, dict]:
    """What the trainer does on resume: DCP-load the newest checkpoint into model and optimiser."""
    states = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, opt),
    }
    found = ckpt.CheckpointManager(out).load_latest(states)
    set_model_state_dict(model, states["model"])
    set_optimizer_state_dict(model, opt, states["optimizer"])
    return found


def _load_run(out: str, result: str) -> None:
    model, opt = _sharded(123)
    path, meta = load_into(out, model, opt)
    full = full_state(model, opt)
    report = {"path": str(path), "iteration": meta["iteration"]}
    Path(f"{result}.rank{dist.get_rank()}.json").write_text(json.dumps(report))
    if dist.get_rank() == 0:
        torch.save(full, result)


def worker(rank: int, mode: str, world: int, port: int, out: str, result: str) -> None:
    """Entry point of one rank (a process of `run_ranks`); its warnings go to a file per rank."""
    import logging

    logging.basicConfig(level=logging.WARNING, filename=f"{result}.rank{rank}.log", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=120))
    try:
        {"save": _save_run, "load": _load_run}[mode](out, result)
    finally:
        dist.destroy_process_group()


def run_ranks(
    mode: str, out: Path, result: Path, world: int = 2, timeout: float = 180
) -> list[str]:
    """Run `worker(mode)` in `world` processes; fail (never hang) on error or timeout. Returns
    each rank's logged warnings."""
    # a rank's error is raised here; hung ranks are killed after the timeout
    start_ranks(worker, (mode, world, free_port(), str(out), str(result)), world, timeout=timeout)
    return [Path(f"{result}.rank{rank}.log").read_text() for rank in range(world)]


# ---- tests ------------------------------------------------------------------------------------
def test_two_ranks_save_sharded_one_process_loads(tmp_path: Path) -> None:
    out, refs_file = tmp_path / "run", tmp_path / "refs.pt"
    run_ranks("save", out, refs_file)
    refs = torch.load(refs_file, weights_only=True)
    for it in (1, 2):
        files = sorted(p.name for p in (out / ckpt.numbered_name(it)).iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "meta.pt"]
        assert ckpt.read_manifest(out / ckpt.numbered_name(it))["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == [*map(ckpt.numbered_name, (1, 2)), "checkpoint-last"]  # fmt: skip
    model, opt = build(123)
    step(model, opt, 0)  # optimiser state to load into
    path, meta = load_into(out, model, opt)
    assert path.name == ckpt.numbered_name(2) and meta["iteration"] == 2 and len(meta["rng"]) == 2
    assert_full_equal(full_state(model, opt), refs[2])  # the async save, resharded 2 -> 1
    first = ckpt.load_checkpoint(out / ckpt.numbered_name(1), ("model", "optimizer"))
    assert_full_equal({"model": first["model"], "optim": first["optimizer"]["state"]}, refs[1])


def test_one_process_checkpoint_loads_on_two_ranks_with_fallback(tmp_path: Path) -> None:
    out, result = tmp_path / "run", tmp_path / "loaded.pt"
    manager, refs = ckpt.CheckpointManager(out), {}
    model, opt = build(0)
    for it in (1, 2):
        step(model, opt, it)
        states = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}  # fmt: skip
        manager.save(it, states, {"iteration": it})
        refs[it] = full_state(model, opt)
    data = out / ckpt.numbered_name(2) / "__0_0.distcp"
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    errors = run_ranks("load", out, result)
    reports = [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1] == {"path": str(out / ckpt.numbered_name(1)), "iteration": 1}
    assert "checkpoint-00000002" in errors[0] and "falling back to" in errors[0]
    assert "checkpoint-00000001" in errors[0]
    assert_full_equal(torch.load(result, weights_only=True), refs[1])  # resharded 1 -> 2
