"""Distillation on the shared trainer, in process: frozen teacher, two students that each learn,
per-student logs and pictures, exact resume of both students, exported students, and 2-process
gloo runs equal to one process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from distill_helpers import MODULES, STUDENT_SIZES, fixed_batches, make_trainer
from safetensors.torch import load_file
from tests_helpers import free_port, start_ranks

import pixio
from distillation.export import export_students
from distillation.task import TEACHER
from pixio.runtime import checkpointing

NULL_EPOCH = "train.iters_per_epoch=null"  # one epoch = the data's length


def test_teacher_is_frozen_and_each_student_gets_only_its_own_gradient(
    distill_config, teacher_path
):
    trainer = make_trainer(distill_config(), fixed_batches(4, 4))
    teacher = trainer.modules[TEACHER]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert TEACHER not in trainer.optimizers and TEACHER not in trainer.trainable
    batch = fixed_batches(1, 4)[0]
    out = trainer.task.step(trainer.modules, batch)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name in MODULES:
        assert all(p.grad is not None for p in trainer.modules[name].parameters())
    together = {n: [p.grad.clone() for p in trainer.modules[n].parameters()] for n in MODULES}
    for name in MODULES:  # the summed loss gives each student the gradient of its own loss
        trainer.modules[name].zero_grad()
    for name in MODULES:
        trainer.task.step(trainer.modules, batch).losses[name].backward()
        for a, b in zip(trainer.modules[name].parameters(), together[name], strict=True):
            torch.testing.assert_close(a.grad, b)
        trainer.modules[name].zero_grad()


def _metrics(trainer) -> list[dict]:
    lines = (trainer.output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_two_students_learn_log_apart_and_leave_the_teacher_unchanged(distill_config, teacher_path):
    cfg = distill_config(
        "train.epochs=8", "train.vis_every=16", "train.log_every=4", "train.save_every_iters=1000",
        NULL_EPOCH,
    )  # fmt: skip
    trainer = make_trainer(cfg, fixed_batches(4, 4))
    trainer.fit()
    records = _metrics(trainer)
    for name in MODULES:
        first, last = records[0][f"loss/{name}"], records[-1][f"loss/{name}"]
        assert last < 0.7 * first, (name, first, last)
        for key in ("loss_cls", "loss_patch", "lr", "grad_norm"):
            assert f"{key}/{name}" in records[-1]
        png = trainer.output_dir / "vis" / f"pca_{name}_step32.png"
        assert png.stat().st_size > 0
    total = sum(records[-1][f"loss/{n}"] for n in MODULES)
    assert records[-1]["loss"] == pytest.approx(total, rel=1e-5)
    original = load_file(str(teacher_path))
    for key, value in trainer.modules[TEACHER].state_dict().items():
        assert torch.equal(value, original[key]), key
    ckpt = checkpointing.load_checkpoint(
        trainer.output_dir / "checkpoint-last", ("model", "optimizer")
    )
    assert sorted(ckpt["model"]) == sorted(ckpt["optimizer"]) == sorted(MODULES)  # no teacher


def test_resume_restores_both_students_exactly(distill_config, tmp_path):
    batches = fixed_batches(8, 4)
    full = make_trainer(distill_config(f"output_dir={tmp_path / 'full'}"), batches)
    full.fit()
    part = [f"output_dir={tmp_path / 'part'}"]
    make_trainer(
        distill_config(*part, "train.max_iters=3", "train.save_every_iters=1"), batches
    ).fit()
    resumed = make_trainer(distill_config(*part), batches)
    resumed.fit()
    assert resumed.progress.iteration == 8
    for name in MODULES:
        a, b = full.full_state(name), resumed.full_state(name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        opt_a = full.optimizers[name].optimizer.state_dict()["state"]
        opt_b = resumed.optimizers[name].optimizer.state_dict()["state"]
        assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    assert not torch.equal(  # the students differ, so a swapped state could not pass the above
        full.full_state(MODULES[0])["last_proj.3.weight"],
        full.full_state(MODULES[1])["last_proj.3.weight"],
    )


def test_exported_students_load_and_match_the_trained_encoders(distill_config, tmp_path):
    trainer = make_trainer(distill_config(), fixed_batches(8, 4))
    trainer.fit()
    out = trainer.output_dir
    again = export_students(out / "checkpoint-last", tmp_path / "exported")
    imgs = torch.randn(2, 3, 64, 64)
    for name, (dim, depth, heads) in STUDENT_SIZES.items():
        sizes = dict(img_size=64, embed_dim=dim, depth=depth, num_heads=heads)
        student = trainer.modules[f"student_{name}"].eval()
        expected = student.features(imgs, [-1])[0]
        sources = [
            (out / f"encoder-{name}.safetensors", None),
            (out / "checkpoint-last", f"student_{name}"),
        ]
        sources.append((tmp_path / "exported" / f"encoder-{name}-step8.safetensors", None))
        for path, module in sources:
            encoder = pixio.load_encoder(name, path, module=module, **sizes).eval()
            got = encoder.features(imgs, [-1])[0]
            for key in ("cls_tokens_norm", "patch_tokens_norm"):
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
        assert "last_proj.0.weight" not in load_file(str(out / f"encoder-{name}.safetensors"))
        # Both exports record their architecture: they load with no name and no sizes.
        for path in (out / f"encoder-{name}.safetensors", sources[-1][0]):
            encoder = pixio.load_encoder(path).eval()
            torch.testing.assert_close(
                encoder.features(imgs, [-1])[0]["patch_tokens_norm"],
                expected["patch_tokens_norm"], rtol=0, atol=0,
            )  # fmt: skip
    assert sorted(p.name for p in again) == sorted(
        f"encoder-{n}-step8.safetensors" for n in STUDENT_SIZES
    )


def _split(batches: list[dict], world: int, rank: int) -> list[dict]:
    n = batches[0]["image"].shape[0] // world
    return [{k: v[rank * n : (rank + 1) * n] for k, v in b.items()} for b in batches]


def _worker(rank: int, world: int, port: int, overrides: list[str], result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    from distill_helpers import compose_distill

    from pixio.runtime.distributed import cleanup, init_distributed

    info = init_distributed()
    torch.set_num_threads(1)
    cfg = compose_distill(overrides)
    trainer = make_trainer(cfg, _split(fixed_batches(4, 8), world, rank), info)
    assert trainer.parallel[TEACHER] == "none"  # small frozen teacher: replicated
    trainer.fit()
    states = {name: trainer.full_state(name) for name in MODULES}
    if rank == 0:
        torch.save(states, result)
    cleanup()


def _without_key_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    """The query and value parts of a qkv bias. The key bias has an exactly zero gradient
    (softmax ignores a shift shared by all keys): what it gets is rounding noise, which differs
    with the batch split and which AdamW scales up to lr-sized steps of any sign."""
    q, _, v = qkv_bias.chunk(3)
    return torch.cat([q, v])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, teacher_path, parallel):
    from distill_helpers import compose_distill, overrides_for

    base = [*overrides_for(teacher_path, tmp_path / "two"), "train.epochs=1", NULL_EPOCH]
    out = str(tmp_path / "two.pth")
    workers = [*base, "train.batch_size=4", f"train.parallel={parallel}"]
    start_ranks(_worker, (2, free_port(), workers, out), nprocs=2)
    torch.set_num_threads(1)
    one = [*overrides_for(teacher_path, tmp_path / "one"), "train.epochs=1", NULL_EPOCH]
    single = make_trainer(compose_distill([*one, "train.batch_size=8"]), fixed_batches(4, 8))
    single.fit()
    two = torch.load(out, weights_only=True)
    for name in MODULES:
        for key, value in single.full_state(name).items():
            got = two[name][key]
            if key.endswith("attn.qkv.bias"):  # the key bias: see _without_key_bias
                got, value = _without_key_bias(got), _without_key_bias(value)
            torch.testing.assert_close(
                got, value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}"
            )
