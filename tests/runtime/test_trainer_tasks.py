"""The shared trainer with tasks other than pre-training: a frozen encoder plus a trainable head on
a finite dataset with validation, and two trainable modules on two optimisers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests_helpers import free_port, start_ranks
from trainer_tasks import (
    HeadTask,
    PerRankTask,
    Regression,
    TwoModuleTask,
    encoder_and_head,
    task_config,
)

from pixio.runtime import checkpointing
from pixio.runtime.config import ConfigError, OptimConfig
from pixio.runtime.distributed import DistInfo
from pixio.runtime.maploader import EvalLoader, MapLoader
from pixio.runtime.optim import Schedule
from pixio.runtime.trainer import Trainer

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
N_TRAIN, N_VAL = 12, 11  # 11: two ranks need one padded sample, which must not count


def head_trainer(cfg, info=SINGLE, frozen: str = "auto", encoder_file=None) -> Trainer:
    encoder, head = encoder_and_head()
    if encoder_file is not None:  # other weights: `load` must replace them
        encoder = encoder_and_head(seed=7)[0]
    task = HeadTask(encoder, head, cfg.optim, frozen, encoder_file)
    rank, world = info.rank, info.world_size
    data = MapLoader(Regression(N_TRAIN), cfg.train.batch_size, rank, world, seed=cfg.train.seed)
    val = EvalLoader(Regression(N_VAL, augment=False), 3, rank, world)
    return Trainer(cfg, task, data, info, {"job": "head"}, val_data=val)


def records_of(output_dir) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def records(trainer: Trainer) -> list[dict]:
    return records_of(trainer.output_dir)


def test_frozen_encoder_and_head_train_validate_and_report_best_and_final(tmp_path):
    trainer = head_trainer(task_config(tmp_path / "run"))
    frozen = {k: v.clone() for k, v in trainer.task.encoder.state_dict().items()}
    trainer.fit()
    # The frozen encoder: unchanged, no gradient, in no optimiser, not in the checkpoint.
    for k, v in trainer.task.encoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None and not p.requires_grad for p in trainer.task.encoder.parameters())
    in_optim = {
        id(p) for g in trainer.optimizers["head"].optimizer.param_groups for p in g["params"]
    }
    assert in_optim == {id(p) for p in trainer.task.head.parameters()}
    ckpt = checkpointing.load_checkpoint(
        trainer.output_dir / "checkpoint-last", ("model", "optimizer")
    )
    assert set(ckpt["model"]) == {"head"} and set(ckpt["optimizer"]) == {"head"}
    # Validation after each of the 3 epochs (6 iterations each); each sample counted once.
    vals = [r for r in records(trainer) if "val/mse" in r]
    assert [r["step"] for r in vals] == [6, 12, 18]
    assert all(r["val/samples"] == N_VAL and r["val/index_sum"] == sum(range(N_VAL)) for r in vals)
    results = json.loads((trainer.output_dir / "val_results.json").read_text())
    best = min(vals, key=lambda r: r["val/mse"])
    assert (
        results["best"]["mse"] == best["val/mse"] and results["best"]["iteration"] == best["step"]
    )
    assert results["last"]["mse"] == vals[-1]["val/mse"] and results["last"]["epoch"] == 3
    assert ckpt["validation"]["best"] == results["best"]  # a resumed run knows its best
    assert vals[-1]["val/mse"] < vals[0]["val/mse"]  # it learned


def test_head_task_resumes_exactly(tmp_path):
    full = head_trainer(task_config(tmp_path / "full"))
    full.fit()
    head_trainer(task_config(tmp_path / "part", max_iters=8, save_every_iters=4)).fit()
    resumed = head_trainer(task_config(tmp_path / "part"))
    with torch.no_grad():
        resumed.task.head.weight.zero_()  # the checkpoint must override the head
    resumed.fit()
    assert resumed.progress.iteration == 18
    for k, v in full.full_state().items():
        assert torch.equal(v, resumed.full_state()[k]), k
    a, b = (json.loads((t.output_dir / "val_results.json").read_text()) for t in (full, resumed))
    assert a == b  # same best (from before the stop) and same final results
    steps = [r["step"] for r in records(resumed) if "loss" in r]
    assert steps == list(range(1, 19))  # the records after the checkpoint were rewound
    # The stop at 8 (mid-epoch) is not the end: no extra validation there.
    assert [r["step"] for r in records(resumed) if "val/mse" in r] == [6, 12, 18]


def _head_worker(rank: int, world: int, port: int, out: str, frozen: str, file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    from pixio.runtime.distributed import cleanup, init_distributed

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    trainer = head_trainer(task_config(out, batch_size=1), info, frozen, file)
    # A small frozen module is replicated; sharded on request (as the 5B teacher is by size).
    placed = "none" if frozen == "auto" else frozen
    assert trainer.parallel == {"encoder": placed, "head": "ddp"}
    trainer.fit()
    state = trainer.full_state()
    if rank == 0:
        torch.save(state, f"{out}/head.pt")
    cleanup()


@pytest.mark.parametrize("frozen", ["auto", "fsdp"])
def test_validation_over_two_processes_counts_each_sample_once(tmp_path, frozen):
    out, file = tmp_path / "two", tmp_path / "encoder.pt"
    torch.save(encoder_and_head(0)[0].state_dict(), file)  # rank 0 reads it, then broadcasts
    start_ranks(_head_worker, (2, free_port(), str(out), frozen, str(file)), nprocs=2)
    results = json.loads((out / "val_results.json").read_text())
    assert results["last"]["samples"] == N_VAL and results["last"]["index_sum"] == sum(range(N_VAL))
    # The reduced metric equals the metric of the final weights over the whole set, computed here.
    encoder, head = encoder_and_head(0)
    head.load_state_dict(torch.load(out / "head.pt", weights_only=True))
    val = Regression(N_VAL, augment=False)
    with torch.no_grad():
        expected = ((head(encoder(val.x)) - val.y) ** 2).mean().item()
    assert results["last"]["mse"] == pytest.approx(expected, rel=1e-6)
    assert results["last"]["iteration"] == 18  # 12 samples / 2 ranks / batch 1, 3 epochs


def two_module_trainer(cfg) -> Trainer:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    optim_a = OptimConfig(lr=0.05, schedule="cosine", warmup_epochs=1, weight_decay=0.0)
    optim_b = OptimConfig(lr=0.01, schedule="poly", warmup_fraction=0.0, weight_decay=0.0)
    data = MapLoader(Regression(N_TRAIN), cfg.train.batch_size, seed=0)
    return Trainer(cfg, TwoModuleTask(a, b, optim_a, optim_b), data, SINGLE, {})


def test_two_modules_on_two_optimisers_step_checkpoint_and_resume(tmp_path):
    full = two_module_trainer(task_config(tmp_path / "full"))
    start = {n: {k: v.clone() for k, v in full.full_state(n).items()} for n in ("a", "b")}
    full.fit()
    rows = [r for r in records(full) if "loss" in r]
    cosine = Schedule("cosine", 0.05, epochs=3, warmup_epochs=1)
    poly = Schedule("poly", 0.01, epochs=3)
    for r in rows:  # each optimiser on its own schedule, set at the iteration's start
        it = r["step"] - 1
        assert r["lr/a"] == pytest.approx(cosine(it / 6), abs=1e-12)
        assert r["lr/b"] == pytest.approx(poly(it / 6), abs=1e-12)
        assert r["loss"] == pytest.approx(r["loss_a"] + r["loss_b"], rel=1e-6)
    for name in ("a", "b"):  # both stepped
        assert not torch.equal(start[name]["weight"], full.full_state(name)["weight"])
    ckpt = checkpointing.load_checkpoint(
        full.output_dir / "checkpoint-last", ("model", "optimizer")
    )
    assert set(ckpt["model"]) == set(ckpt["optimizer"]) == {"a", "b"}
    assert set(ckpt["scalers"]) == {"a", "b"}
    two_module_trainer(task_config(tmp_path / "part", max_iters=5, save_every_iters=5)).fit()
    resumed = two_module_trainer(task_config(tmp_path / "part"))
    resumed.fit()
    for name in ("a", "b"):
        for k, v in full.full_state(name).items():
            assert torch.equal(v, resumed.full_state(name)[k]), (name, k)


def test_epoch_length_comes_from_finite_data_and_may_not_exceed_it(tmp_path):
    trainer = head_trainer(task_config(tmp_path / "a"))
    assert trainer.iters_per_epoch == N_TRAIN // 2 and trainer.total_iters == 18
    for wrong in (7, 5):  # a finite loader runs its own epochs: no other length
        with pytest.raises(
            ConfigError, match=f"train.iters_per_epoch: {wrong}, but the data has 6"
        ):
            head_trainer(task_config(tmp_path / f"b{wrong}", iters_per_epoch=wrong))
    encoder, head = encoder_and_head()
    stream = iter([])  # no length: an endless stream must say its epoch length
    with pytest.raises(ConfigError, match="train.iters_per_epoch: required for a stream"):
        Trainer(
            task_config(tmp_path / "c"), HeadTask(encoder, head, OptimConfig()), stream, SINGLE, {}
        )


def test_a_plain_list_shorter_than_its_claimed_length_fails_clearly(tmp_path):
    class Liar(list):
        def __len__(self) -> int:
            return 6

    batches = Liar([Regression(4)[i] for i in range(2)])
    encoder, head = encoder_and_head()
    cfg = task_config(tmp_path / "liar", optim={"lr": 0.01})
    trainer = Trainer(cfg, HeadTask(encoder, head, cfg.optim), batches, SINGLE, {})
    with pytest.raises(RuntimeError, match="the data ran out after 2 batches in epoch 0"):
        trainer.fit()


def test_a_module_in_no_optimiser_or_in_two_is_refused(tmp_path):
    class Orphan(TwoModuleTask):
        def optimizers(self):
            return {"a": super().optimizers()["a"]}

    cfg = task_config(tmp_path / "x")
    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    data = MapLoader(Regression(N_TRAIN), 2)
    with pytest.raises(ValueError, match="trainable modules in no optimiser: b"):
        Trainer(cfg, Orphan(a, b, cfg.optim, cfg.optim), data, SINGLE, {})


def _per_rank_worker(rank: int, world: int, port: int, out: str, max_iters: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    import torch.distributed as dist

    from pixio.runtime.distributed import cleanup, init_distributed

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    group, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)])
    cfg = task_config(out, max_iters=max_iters, save_every_iters=4, precision="fp16")
    cfg.optim.lr, cfg.optim.blr = None, 0.128  # lr from the batch of the module's group
    torch.manual_seed(rank)
    task = PerRankTask(f"s{rank}", torch.nn.Linear(4, 1), group, cfg.optim)
    data = MapLoader(Regression(N_TRAIN), 2, seed=rank)  # each student its own order
    trainer = Trainer(cfg, task, data, info, {})
    assert trainer.parallel == {f"s{rank}": "none"}  # a group of one: nothing to replicate
    assert trainer.optimizers[f"s{rank}"].schedule.base_lr == 0.128 * 2 / 256  # not 2 ranks' batch
    trainer.fit()
    cleanup()


def test_modules_in_process_subgroups_train_checkpoint_resume_and_export(tmp_path):
    out = tmp_path / "groups"
    for max_iters in (6, None):  # stop at 6 (checkpoint at 4 and 6), then resume to 18
        start_ranks(_per_rank_worker, (2, free_port(), str(out), max_iters), nprocs=2)
    ckpt = checkpointing.load_checkpoint(out / "checkpoint-last", ("model", "optimizer"))
    assert ckpt["iteration"] == 18 and set(ckpt["model"]) == set(ckpt["optimizer"]) == {"s0", "s1"}
    assert set(ckpt["scalers"]) == {"s0", "s1"}  # every rank's fp16 scaler, not only rank 0's
    assert all(state["scale"] > 0 for state in ckpt["scalers"].values())
    for name in ("s0", "s1"):  # each exported by its own group, equal to its checkpoint
        exported = torch.load(out / f"{name}.pt", weights_only=True)
        for k, v in exported.items():
            assert torch.equal(v, ckpt["model"][name][k]), (name, k)
    rows = [r for r in records_of(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 19))
    merged = {f"{k}/s{r}" for k in ("loss", "lr", "grad_norm") for r in (0, 1)}
    assert all(merged <= r.keys() for r in rows)  # rank 0 logs what every rank reported


def test_fp16_with_two_optimisers_needs_and_uses_per_optimiser_losses(tmp_path):
    def run(split: bool, out: str) -> Trainer:
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        cfg = task_config(tmp_path / out, precision="fp16", max_iters=3)
        task = TwoModuleTask(a, b, cfg.optim, cfg.optim, split_losses=split)
        return Trainer(cfg, task, MapLoader(Regression(N_TRAIN), 2), SINGLE, {})

    with pytest.raises(ValueError, match="fp16 with several optimisers needs StepOutput.losses"):
        run(False, "one").fit()
    trainer = run(True, "split")
    trainer.fit()
    scales = {n: s.scaler.get_scale() for n, s in trainer.optimizers.items()}
    assert set(scales) == {"a", "b"} and all(v > 0 for v in scales.values())


def test_a_nan_result_never_stays_the_best():
    from pixio.runtime.task import Validation

    spec = Validation("miou", mode="max")
    assert spec.better(float("nan"), None) and spec.better(0.3, float("nan"))
    assert not spec.better(float("nan"), 0.3) and spec.better(0.5, 0.3)
    assert Validation("rmse", mode="min").better(0.2, 0.3)


def test_frozen_blocks_hold_bf16_only_on_gpus_under_bf16():
    from pixio.runtime.task import ModuleSpec
    from pixio.runtime.trainer import cast_frozen_blocks

    def spec():
        root = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        return ModuleSpec(root, trainable=False, shard_units=[root[1]])

    s = spec()  # the cast itself needs no GPU: only the decision reads the device
    assert cast_frozen_blocks(s, torch.device("cuda"), "bf16") == 2
    assert s.module[1].weight.dtype == torch.bfloat16  # the block
    assert s.module[0].weight.dtype == torch.float32  # the root stays fp32
    for device, precision in (("cpu", "bf16"), ("cuda", "fp32"), ("cuda", "fp16")):
        s = spec()
        assert cast_frozen_blocks(s, torch.device(device), precision) == 4
        assert all(p.dtype == torch.float32 for p in s.module.parameters())
