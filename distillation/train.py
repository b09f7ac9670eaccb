"""Pixio distillation entry point: one frozen teacher, several students, one run.

    python -m distillation.train experiment=distill_demo
    python -m distillation.train teacher.name=pixio_vit5b16 teacher.checkpoint=/ckpt/5b.pth \\
        students=[pixio_vit1b16,pixio_vith16] data.root=/data/in1k output_dir=outputs/distill
    python -m distillation.train experiment=distill_vit5b16_to_vit1b16_vith16_imagenet ...

`main(cfg)` is the job itself (set up, build, run, close); `cli` validates the config, makes
the demo teacher when asked (`teacher.build_demo`), and hands `main` to the launcher.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from distillation.config import register_configs, shape_keys, teacher_build, validate_distill
from pixio.models.registry import build_encoder
from pixio.runtime.config import ConfigError, to_container
from pixio.runtime.job import run_job
from pixio.runtime.launcher import validate_and_launch

if TYPE_CHECKING:  # torch and the trainer load in `main`: --help and config errors stay fast
    from distillation.model import Student
    from distillation.task import DistillTask
    from pixio.models.encoder import PixioEncoder

log = logging.getLogger("pixio.distill")
register_configs()
REPO = Path(__file__).resolve().parents[1]
DEMO_TEACHER_TIMEOUT_S = 3600  # the pre-training demo takes minutes on 2 CPU cores


def build_teacher(cfg: DictConfig) -> PixioEncoder:
    """The teacher encoder of the architecture its checkpoint records, else of `teacher.*`
    (`teacher_build`; weights: loaded once the trainer placed it)."""
    name, kwargs = teacher_build(cfg.teacher)
    return build_encoder(name, **kwargs)


def build_students(cfg: DictConfig, teacher_dim: int) -> dict[str, Student]:
    """Every student of `students`, by module name (student_<encoder name>)."""
    from distillation.model import build_student
    from distillation.task import student_module

    s = cfg.student
    common = dict(img_size=cfg.img_size, n_cls_tokens=cfg.teacher.n_cls_tokens)
    return {
        student_module(name): build_student(
            name, teacher_dim, cfg.mask_grid, drop_path=s.drop_path, **common,
            **dict(s.overrides.get(name) or {}),
        )
        for name in cfg.students
    }  # fmt: skip


def build_task(cfg: DictConfig) -> DistillTask:
    """Teacher and students on the meta device (the trainer materialises them: students from
    their seeds, the teacher from its checkpoint)."""
    import torch

    from distillation.model import teacher_loader
    from distillation.task import DistillTask

    with torch.device("meta"):
        teacher = build_teacher(cfg)
        students = build_students(cfg, teacher.embed_dim)
    load = teacher_loader(cfg.teacher.checkpoint)
    return DistillTask(teacher, students, load, cfg.loss, cfg.mask_ratio, cfg.optim)


def main(cfg: DictConfig) -> None:
    """Distil one teacher into every student: set up, build, run, close."""
    import torch

    from pixio.data.loader import build_data
    from pixio.runtime.runconfig import check_resume
    from pixio.runtime.trainer import Trainer

    validate_distill(cfg)
    with run_job(cfg.output_dir, cfg.train.device, cfg.train.cpu_threads) as info:
        config = to_container(cfg)
        check_resume(cfg.output_dir, config, shape_keys(cfg))
        # data mistakes stop before any model exists
        data = build_data(cfg.data, cfg.train, cfg.img_size, info.rank, info.world_size)
        torch.manual_seed(cfg.train.seed)  # identical initial students on every rank
        task = build_task(cfg)
        torch.manual_seed(cfg.train.seed + 1 + info.rank)  # different masks / drop path per rank
        Trainer(cfg, task, data, info, config).fit()
        if info.rank == 0:
            log.info(
                "done: checkpoints, metrics.jsonl, vis/ and encoder-<student>.safetensors in %s",
                Path(cfg.output_dir).resolve(),
            )


def ensure_demo_teacher(cfg: DictConfig) -> None:
    """With `teacher.build_demo`, a missing teacher checkpoint is made by the pre-training demo
    (`python -m pretraining.train experiment=demo`, into the checkpoint's folder)."""
    path = Path(cfg.teacher.checkpoint).expanduser().resolve()  # the demo runs in the repo
    if not cfg.teacher.build_demo or path.exists():
        return
    cmd = [
        sys.executable,
        "-m",
        "pretraining.train",
        "experiment=demo",
        f"output_dir={path.parent}",
    ]
    log.warning(
        "teacher %s is missing: running the pre-training demo first: %s", path, " ".join(cmd)
    )
    done = subprocess.run(cmd, cwd=REPO, timeout=DEMO_TEACHER_TIMEOUT_S, check=False)
    if done.returncode != 0 or not path.exists():
        raise ConfigError(
            f"teacher.checkpoint: the pre-training demo (exit {done.returncode}) did not make {path}"
        )


# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(REPO / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="distill", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, make the demo teacher if asked, then run `main` through the launcher."""
    validate_and_launch(main, cfg, prepare)


def prepare(cfg: DictConfig) -> None:
    """Validate; with the demo teacher asked for and missing, pre-train it, then validate again."""
    validate_distill(cfg, teacher_may_be_missing=cfg.teacher.build_demo)
    ensure_demo_teacher(cfg)
    validate_distill(cfg)


if __name__ == "__main__":
    cli()
