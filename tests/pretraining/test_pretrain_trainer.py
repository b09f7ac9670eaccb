"""The shared training loop on in-memory batches: accumulation, DDP parity, NaN stop, resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tests_helpers import free_port, start_ranks

from pixio.runtime import checkpointing
from pixio.runtime.config import to_container
from pixio.runtime.distributed import DistInfo
from pixio.runtime.trainer import NonFiniteLossError, Trainer
from pretraining.task import MODULE, MAETask
from pretraining.train import build_model

NULL_EPOCH = "train.iters_per_epoch=null"  # one epoch = the data's length
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def fixed_batches(n: int, batch: int, seed: int = 0) -> list[dict]:
    """Images and masking noise fixed in advance, so runs can be compared exactly."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(batch, 3, 64, 64, generator=g),
            "noise": torch.rand(batch, 4, generator=g),
        }
        for _ in range(n)
    ]


def split(batches: list[dict], parts: int, index: int) -> list[dict]:
    """Every batch cut into `parts` equal slices along the batch axis; keep slice `index`."""
    out = []
    for b in batches:
        n = b["image"].shape[0] // parts
        out.append({k: v[index * n : (index + 1) * n] for k, v in b.items()})
    return out


def micro_batches(batches: list[dict], parts: int) -> list[dict]:
    """Each batch as `parts` consecutive micro-batches (for gradient accumulation)."""
    return [m for b in batches for m in (split([b], parts, i)[0] for i in range(parts))]


def make_trainer(cfg, batches, info=SINGLE) -> Trainer:
    torch.manual_seed(0)
    task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim)
    return Trainer(cfg, task, batches, info, to_container(cfg))


def record_grads(trainer: Trainer) -> list[dict]:
    """Capture the gradients each optimiser step sees."""
    seen: list[dict] = []
    optimizer = trainer.optimizers[MODULE].optimizer
    step = optimizer.step

    def wrapped(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in trainer.task.model.named_parameters()})
        return step(*args, **kwargs)

    optimizer.step = wrapped
    return seen


def test_accumulation_matches_larger_batch(cpu_config):
    data = fixed_batches(1, 8)
    big = make_trainer(cpu_config("train.batch_size=8", "train.max_iters=1", NULL_EPOCH), data)
    grads_big = record_grads(big)
    big.fit()
    cfg = cpu_config(
        "train.batch_size=4",
        "train.accum_iter=2",
        "train.max_iters=2",
        NULL_EPOCH,
        "output_dir=" + str(big.output_dir) + "_acc",
    )
    acc = make_trainer(cfg, micro_batches(data, 2))
    grads_acc = record_grads(acc)
    acc.fit()
    assert len(grads_big) == len(grads_acc) == 1
    assert big.optimizers[MODULE].schedule.base_lr == acc.optimizers[MODULE].schedule.base_lr
    for name, g in grads_big[0].items():
        torch.testing.assert_close(grads_acc[0][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_run_writes_checkpoints_metrics_and_encoder(cpu_config):
    cfg = cpu_config("train.keep_last=1")
    trainer = make_trainer(cfg, fixed_batches(8, 4))
    trainer.fit()
    out = trainer.output_dir
    assert (out / "encoder.safetensors").exists()
    ckpt = checkpointing.load_checkpoint(out / "checkpoint-last", ("model", "optimizer"))
    assert ckpt["iteration"] == 8 and ckpt["epoch"] == 2
    assert ckpt["config"]["model"]["name"] == "pixio_vitt16"
    assert "decoder_pred.weight" in ckpt["model"][MODULE] and MODULE in ckpt["optimizer"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8


def test_non_finite_loss_stops_and_keeps_last_checkpoint(cpu_config):
    batches = fixed_batches(8, 4)
    batches[5]["image"][0, 0, 0, 0] = float("nan")
    cfg = cpu_config("train.epochs=1", "train.iters_per_epoch=8", "train.save_every_iters=2")
    trainer = make_trainer(cfg, batches)  # one epoch: batch i is iteration i
    with pytest.raises(NonFiniteLossError, match="loss is nan at iteration 5"):
        trainer.fit()
    ckpt = checkpointing.load_checkpoint(
        trainer.output_dir / "checkpoint-last", ("model", "optimizer")
    )
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"][MODULE].values())


def test_resume_continues_exactly(cpu_config, tmp_path):
    batches = fixed_batches(8, 4)
    full = make_trainer(cpu_config(f"output_dir={tmp_path / 'full'}"), batches)
    full.fit()
    part_cfg = cpu_config(
        f"output_dir={tmp_path / 'part'}", "train.max_iters=3", "train.save_every_iters=1"
    )
    make_trainer(part_cfg, batches).fit()
    resumed = make_trainer(cpu_config(f"output_dir={tmp_path / 'part'}"), batches)
    resumed.fit()
    a, b = full.full_state(), resumed.full_state()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _ddp_worker(
    rank: int, world: int, port: int, overrides: list[str], result_path: str, accum: int = 1
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    from tests_helpers import compose_pretrain

    from pixio.runtime.distributed import cleanup, init_distributed

    info = init_distributed()
    torch.set_num_threads(1)
    cfg = compose_pretrain(overrides)
    trainer = make_trainer(cfg, micro_batches(split(fixed_batches(4, 8), world, rank), accum), info)
    assert trainer.parallel == {MODULE: cfg.train.parallel}
    trainer.fit()
    state = trainer.full_state()
    if rank == 0:
        torch.save(state, result_path)
    cleanup()


def _two_processes_match_one(tmp_path, base: list[str], workers: list[str], accum: int = 1) -> None:
    """2 gloo processes with `workers` overrides end with the weights of one process on
    batches of 8 (the same images, split over ranks and micro-batches)."""
    from tests_helpers import compose_pretrain

    out = tmp_path / "two.pth"
    overrides = [*base, *workers, f"output_dir={tmp_path / 'two'}"]
    start_ranks(_ddp_worker, (2, free_port(), overrides, str(out), accum), nprocs=2)
    torch.set_num_threads(1)
    single = make_trainer(
        compose_pretrain([*base, "train.batch_size=8", f"output_dir={tmp_path / 'one'}"]),
        fixed_batches(4, 8),
    )
    single.fit()
    two = torch.load(out, weights_only=True)
    for k, v in single.full_state().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gloo_matches_single_process(tmp_path, parallel):
    from tests_helpers import CPU_OVERRIDES

    base = [*CPU_OVERRIDES, "data.root=unused", "train.epochs=1", f"train.parallel={parallel}"]
    _two_processes_match_one(tmp_path, base, ["train.batch_size=4"])


def test_fsdp_accumulation_keeps_sharded_gradients_and_matches_one_big_batch(tmp_path):
    """2 ranks x 2 micro-batches of 2 under FSDP (gradient sync on every micro-step, so no
    unsharded gradient is kept) equal one process on batches of 8."""
    from tests_helpers import CPU_OVERRIDES

    # Clipping on: the sharded gradient norm and the in-place scaling match one process too.
    base = [*CPU_OVERRIDES, "data.root=unused", "train.epochs=1", "optim.clip_grad=0.05"]
    workers = ["train.parallel=fsdp", "train.batch_size=2", "train.accum_iter=2",
               "train.iters_per_epoch=8", "train.save_every_iters=8"]  # fmt: skip
    _two_processes_match_one(tmp_path, base, workers, accum=2)


def test_logged_loss_is_the_mean_over_the_logging_window(cpu_config):
    import json

    trainer = make_trainer(cpu_config("train.log_every=3"), fixed_batches(8, 4))
    seen: list[float] = []
    step = trainer.train_iteration

    def recorded(it, batch):
        values = step(it, batch)
        seen.append(float(values["loss"]))  # a device tensor: read it here, in the test
        return values

    trainer.train_iteration = recorded
    trainer.fit()
    lines = (trainer.output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [3, 6, 8]  # every 3 iterations and the last one
    for r, window in zip(records, (seen[0:3], seen[3:6], seen[6:8]), strict=True):
        assert r["loss"] == pytest.approx(sum(window) / len(window), rel=1e-12)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_checkpoints_fp32_weights(cpu_config, precision):
    cfg = cpu_config(f"train.precision={precision}", "train.epochs=1", "optim.clip_grad=1.0")
    trainer = make_trainer(cfg, fixed_batches(4, 4))
    scaler = trainer.optimizers[MODULE].scaler
    assert scaler.is_enabled() == (precision == "fp16")  # a scaler only for fp16
    before = {k: v.clone() for k, v in trainer.full_state().items()}
    trainer.fit()
    ckpt = checkpointing.load_checkpoint(
        trainer.output_dir / "checkpoint-last", ("model", "optimizer")
    )
    weights = ckpt["model"][MODULE]
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(not torch.equal(before[k], v) for k, v in weights.items())  # it learned
    assert bool(ckpt["scalers"][MODULE]) == (precision == "fp16")


def test_activation_checkpointing_gives_the_same_gradients(cpu_config, tmp_path):
    data = fixed_batches(1, 4)
    grads = []
    for flag in (False, True):
        cfg = cpu_config(f"train.activation_checkpointing={flag}", "train.max_iters=1", NULL_EPOCH)
        cfg.output_dir = str(tmp_path / f"ac_{flag}")
        trainer = make_trainer(cfg, data)
        assert trainer.task.model.grad_checkpointing is flag
        grads.append(record_grads(trainer))
        trainer.fit()
    for name, g in grads[0][0].items():
        torch.testing.assert_close(grads[1][0][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_rerun_after_the_end_changes_nothing(cpu_config):
    cfg = cpu_config()
    make_trainer(cfg, fixed_batches(8, 4)).fit()
    out = Path(cfg.output_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if "checkpoint" in str(p)}
    again = make_trainer(cfg, fixed_batches(8, 4))
    again.fit()
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if "checkpoint" in str(p)}
    assert again.progress.iteration == 8 and after == before
