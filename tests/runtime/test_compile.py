"""Per-block compilation (pixio.runtime.compile): one graph per block stack whatever its depth,
no graph break inside a block, under FSDP2, DDP and activation checkpointing (2-process gloo);
the losses of eager training; evaluation calls (eval mode, no gradients) never compile."""

from __future__ import annotations

import os

import pytest
import torch
from tests_helpers import free_port, start_ranks
from torch._dynamo.utils import counters

import pixio
from pixio.runtime.compile import compile_enabled, compile_units, frozen_path, training_path

pytestmark = pytest.mark.timeout(300)

TINY = dict(embed_dim=32, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2, img_size=32,
            mask_grid=2, drop_path=0.2)  # fmt: skip
MODES = ("fsdp", "ddp", "fsdp_ac")


def _mae(depth: int) -> pixio.PixioMAE:
    torch.manual_seed(0)
    return pixio.build_mae("pixio_vitt16", depth=depth, decoder_depth=depth, **TINY)


def _units(mae: pixio.PixioMAE) -> list[torch.nn.Module]:
    return [*mae.blocks, *mae.decoder_blocks]


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 1, generator=g)


def _train(net: torch.nn.Module, mae: pixio.PixioMAE, rank: int, steps: int = 2) -> list[float]:
    """`steps` SGD steps on fixed data (drop path draws from the global generator)."""
    opt = torch.optim.SGD(mae.parameters(), lr=0.1)
    images, noise = _batch(rank)
    torch.manual_seed(100 + rank)
    losses = []
    for _ in range(steps):
        loss = net(images, mask_ratio=0.5, noise=noise).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _counts() -> dict[str, int]:
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "frames": counters["frames"]["total"],
    }


def _wrap(mode: str, mae: pixio.PixioMAE) -> torch.nn.Module:
    from pixio.runtime.parallel import fully_shard_model

    if mode.endswith("_ac"):
        mae.set_grad_checkpointing(True)
    if mode.startswith("fsdp"):
        return fully_shard_model(mae, _units(mae), param_dtype=None)
    return torch.nn.parallel.DistributedDataParallel(mae)


def _run_mode(mode: str, depth: int, rank: int) -> dict:
    """Eager losses, then compiled ones (graphs counted), then evaluation calls (must not
    compile anything)."""
    mae = _mae(depth)
    eager = _train(_wrap(mode, mae), mae, rank)
    torch._dynamo.reset()
    counters.clear()
    mae = _mae(depth)
    net = _wrap(mode, mae)  # sharded / wrapped first: the block forward is replaced after
    assert compile_units(_units(mae), training_path, backend="aot_eager") == 2 * depth
    compiled = _train(net, mae, rank)
    after_training = _counts()
    net.eval()
    with torch.no_grad():  # the trainer's pictures and validation
        net(_batch(rank)[0], mask_ratio=0.5)
        net(_batch(rank)[0][:1], mask_ratio=0.0)
    net.train()
    _train(net, mae, rank, steps=1)
    return {"eager": eager, "compiled": compiled, "train": after_training, "end": _counts()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {f"{m}/{d}": _run_mode(m, d, rank) for m in MODES for d in (2, 4)}
        torch.save(results, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("compile") / "counts.pt")
    start_ranks(_worker, (2, free_port(), out), nprocs=2)
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("mode", MODES)
def test_one_graph_per_stack_whatever_the_depth_and_no_graph_break(runs, mode):
    for rank in runs:
        shallow, deep = rank[f"{mode}/2"], rank[f"{mode}/4"]
        # Encoder and decoder blocks: two shapes of the same code, one graph each.
        assert shallow["train"] == deep["train"] == {"graphs": 2, "breaks": 0, "frames": 2}


@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_gives_the_eager_losses(runs, mode):
    for rank in runs:
        for depth in (2, 4):
            r = rank[f"{mode}/{depth}"]
            assert r["eager"][0] > 0
            torch.testing.assert_close(r["compiled"], r["eager"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_calls_do_not_recompile(runs, mode):
    for rank in runs:
        for depth in (2, 4):
            r = rank[f"{mode}/{depth}"]
            assert r["end"] == r["train"]  # eval + no_grad ran eagerly; training reused its graphs


def test_drop_path_rate_is_not_a_guard_single_process():
    """The former timm DropPath (a float per block) compiled one graph per distinct rate."""
    for depth in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        encoder = pixio.build_encoder("pixio_vitt16", depth=depth, **{k: TINY[k] for k in ("embed_dim", "num_heads", "img_size", "drop_path")})  # fmt: skip
        compile_units(encoder.blocks, training_path, backend="eager")
        x = torch.randn(2, 12, 32, requires_grad=True)
        for block in encoder.blocks:
            x = block(x)
        x.sum().backward()
        assert _counts() == {"graphs": 1, "breaks": 0, "frames": 1}


def test_frozen_units_compile_only_while_the_job_trains():
    torch._dynamo.reset()
    counters.clear()
    encoder = pixio.build_encoder("pixio_vitt16", depth=2, embed_dim=32, num_heads=2).eval()
    head = torch.nn.Linear(32, 1)  # the job's trainable module
    compile_units(encoder.blocks, frozen_path(lambda: head.training), backend="eager")
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        encoder.blocks[0](x)  # the training step: compiled
        head.eval()
        encoder.blocks[0](x[:1])  # pictures / validation: eager, another shape compiles nothing
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1
    assert compile_units(encoder.blocks, training_path) == 0  # already compiled: left as is


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [("auto", "cuda", True), ("auto", "cpu", False), (None, "cuda", True), (True, "cpu", True),
     ("true", "cpu", True), ("False", "cuda", False), (False, "cuda", False)],
)  # fmt: skip
def test_compile_setting(setting, device, expected):
    assert compile_enabled(setting, torch.device(device)) is expected


def test_compile_setting_refuses_other_values(cpu_config):
    from pixio.runtime.config import ConfigError, check_train

    with pytest.raises(ValueError, match="compile must be one of auto, true, false"):
        compile_enabled("yes", torch.device("cpu"))
    assert cpu_config().train.compile == "auto"
    assert cpu_config("train.compile=true").train.compile in ("true", "True")
    with pytest.raises(ConfigError, match=r"^train.compile: must be one of auto, true, false"):
        check_train(cpu_config("train.compile=always").train)
