"""Helpers of the distillation tests: a tiny teacher written by the test, the real distillation
config composed and shrunk for CPU, fixed batches and an in-process trainer."""

from __future__ import annotations

from pathlib import Path

import torch
from tests_helpers import CONFIG_DIR

import pixio
from distillation.train import build_task
from pixio.runtime.config import to_container
from pixio.runtime.distributed import DistInfo
from pixio.runtime.trainer import Trainer

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TEACHER = dict(img_size=64, embed_dim=32, depth=2, num_heads=2)
STUDENTS = ("pixio_vitt16", "pixio_vits16")
MODULES = tuple(f"student_{n}" for n in STUDENTS)
STUDENT_SIZES = {"pixio_vitt16": (16, 1, 2), "pixio_vits16": (24, 2, 2)}  # dim, depth, heads
GROUPS = 4  # 64 px, patch 16, mask_grid 2: 4 x 4 patches in 2 x 2 groups


def write_teacher(path: Path, seed: int = 0) -> Path:
    """A tiny pixio_vitt16 teacher (random weights, 64 px) saved as the checkpoint to distil."""
    torch.manual_seed(seed)
    return pixio.save_encoder(pixio.build_encoder("pixio_vitt16", **TEACHER), path)


def overrides_for(teacher: Path, out: Path, teacher_sizes: bool = True) -> list[str]:
    """What every CPU test run sets: tiny teacher and students, short schedule, no tracker.
    `teacher_sizes=False`: the teacher's sizes left to its file's record."""
    # `++`: a new key of the (struct) overrides dict, added or replaced
    sizes = [
        f"++student.overrides.{n}={{embed_dim:{d},depth:{k},num_heads:{h}}}"
        for n, (d, k, h) in STUDENT_SIZES.items()
    ]
    return [
        "teacher.name=pixio_vitt16", f"teacher.checkpoint={teacher}",
        *(f"teacher.{k}={v}" for k, v in TEACHER.items() if teacher_sizes),
        f"students=[{','.join(STUDENTS)}]", *sizes,
        "student.drop_path=0.0", "img_size=64", "mask_grid=2", "mask_ratio=0.5",
        "train.batch_size=4", "train.epochs=2", "train.iters_per_epoch=4",
        "train.save_every_iters=4", "train.log_every=1", "train.vis_every=0",
        "train.precision=fp32", "train.device=cpu", "optim.lr=1e-3", "optim.warmup_epochs=1",
        "logger=none", "launcher=local", "data.root=unused", "data.num_workers=0",
        f"output_dir={out}",
    ]  # fmt: skip


def compose_distill(overrides: list[str]):
    """Compose the real distillation config (configs/distill.yaml) with overrides."""
    from hydra import compose, initialize_config_dir

    from distillation.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="distill", overrides=overrides)


def fixed_batches(n: int, batch: int, seed: int = 0) -> list[dict]:
    """Images and masking noise fixed in advance, so runs can be compared exactly."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(batch, 3, 64, 64, generator=g),
            "noise": torch.rand(batch, GROUPS, generator=g),
        }
        for _ in range(n)
    ]


def make_trainer(cfg, batches, info: DistInfo = SINGLE) -> Trainer:
    """The trainer `distillation.train.main` builds, on in-memory batches."""
    torch.manual_seed(cfg.train.seed)
    return Trainer(cfg, build_task(cfg), batches, info, to_container(cfg))
