"""One objective on every path: a bf16 step under DDP and under FSDP (2-process gloo) computes the
norm-pix targets from the same fp32 images and gives the same loss and gradients within bf16
tolerance; a meta-built, FSDP-sharded model starts from the weights of a single-process build."""

from __future__ import annotations

import os

import pytest
import torch
from tests_helpers import CPU_OVERRIDES, compose_pretrain, free_port, start_ranks

pytestmark = pytest.mark.timeout(300)


def _batch(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(0)
    images, noise = torch.randn(8, 3, 64, 64, generator=g), torch.rand(8, 4, generator=g)
    n = 8 // world
    return {"image": images[rank * n : (rank + 1) * n], "noise": noise[rank * n : (rank + 1) * n]}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _worker(rank: int, world: int, port: int, parallel: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    import pixio.models.mae as mae_module
    from pixio.runtime.config import to_container
    from pixio.runtime.distributed import cleanup, init_distributed
    from pixio.runtime.trainer import Trainer
    from pretraining.task import MAETask
    from pretraining.train import build_model

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    cfg = compose_pretrain([*CPU_OVERRIDES, "data.root=unused", "train.precision=bf16",
                            f"train.parallel={parallel}", f"output_dir={out}-{parallel}"])  # fmt: skip
    seen: dict = {}
    targets = mae_module.pixel_targets

    def recording_targets(imgs, patch_size, norm_pix_loss):
        seen["input_dtype"], seen["target"] = imgs.dtype, targets(imgs, patch_size, norm_pix_loss)
        return seen["target"]

    mae_module.pixel_targets = recording_targets
    torch.manual_seed(0)
    with torch.device("meta"):
        task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim)
    trainer = Trainer(cfg, task, iter(()), info, to_container(cfg))  # placement only: no data
    initial = trainer.full_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.step(trainer.modules, _batch(rank, world)).loss
    loss.backward()
    grads = {n: _full(p.grad) for n, p in task.model.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss.detach().float(), "grads": grads, "initial": initial, **seen}, out)
    cleanup()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("precision")
    results = {}
    for parallel in ("ddp", "fsdp"):
        out = str(tmp / f"{parallel}.pt")
        start_ranks(_worker, (2, free_port(), parallel, out), nprocs=2)
        results[parallel] = torch.load(out, weights_only=True)
    return results


def test_targets_are_bit_identical_and_built_from_fp32_images(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert ddp["input_dtype"] == fsdp["input_dtype"] == torch.float32
    assert fsdp["target"].dtype == torch.float32
    assert torch.equal(ddp["target"], fsdp["target"])


def test_one_bf16_step_gives_the_same_loss_and_gradients(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    torch.testing.assert_close(fsdp["loss"], ddp["loss"], rtol=1e-2, atol=0)
    assert ddp["grads"].keys() == fsdp["grads"].keys()
    for name, g in ddp["grads"].items():
        scale = g.abs().max().item() + 1e-12
        diff = (fsdp["grads"][name] - g).abs().max().item()
        assert diff <= 0.03 * scale, f"{name}: max diff {diff:.3g} vs max |grad| {scale:.3g}"


def test_meta_build_sharded_starts_from_the_single_process_weights(runs):
    from pretraining.train import build_model

    cfg = compose_pretrain([*CPU_OVERRIDES, "data.root=unused", "output_dir=unused"])
    torch.manual_seed(0)
    reference = build_model(cfg).state_dict()
    for parallel in ("ddp", "fsdp"):
        initial = runs[parallel]["initial"]
        assert initial.keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(initial[k], v), f"{parallel}: {k}"
