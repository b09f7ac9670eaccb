"""Pixio pre-training entry point.

    python -m pretraining.train experiment=demo
    python -m pretraining.train model=vitl16 data.root=/data/in1k output_dir=outputs/l16
    python -m pretraining.train experiment=pretrain_vith16_imagenet data.root=... launcher=slurm

`main(cfg)` is the job itself (set up, build, run, close); `cli` validates the config and hands
`main` to the launcher (in-process, torchrun, or a SLURM job through submitit). torch and the
trainer are imported by `main`: `--help`, `--cfg job` and a config error never load them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pixio.runtime.config import to_container
from pixio.runtime.job import run_job
from pixio.runtime.launcher import validate_and_launch
from pretraining.config import SHAPE_KEYS, build_model, register_configs, validate_pretrain

log = logging.getLogger("pixio.pretrain")
register_configs()


def main(cfg: DictConfig) -> None:
    """Pre-train one Pixio MAE: set up, build, run, close."""
    import torch

    from pixio.data.loader import build_data
    from pixio.monitor import KnnMonitor
    from pixio.runtime.runconfig import check_resume
    from pixio.runtime.trainer import Trainer
    from pretraining.task import MAETask

    validate_pretrain(cfg)
    with run_job(cfg.output_dir, cfg.train.device, cfg.train.cpu_threads) as info:
        config = to_container(cfg)
        check_resume(cfg.output_dir, config, SHAPE_KEYS)
        # data mistakes stop before the model exists
        data = build_data(cfg.data, cfg.train, cfg.model.img_size, info.rank, info.world_size)
        monitor = KnnMonitor(cfg.monitor, cfg.model.img_size, info) if cfg.monitor.knn_root else None  # fmt: skip
        init_from = initial_weights(cfg, info.rank)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        with torch.device("meta"):  # materialised (FSDP: shard by shard) by the trainer
            model = build_model(cfg)
        task = MAETask(model, cfg.model.mask_ratio, cfg.optim, cfg.model.name, init_from)
        task.monitor(monitor, cfg.monitor.every)
        torch.manual_seed(cfg.train.seed + 1 + info.rank)  # different masks / drop path per rank
        Trainer(cfg, task, data, info, config).fit()
        if info.rank == 0:
            log.info(
                "done: checkpoints, metrics.jsonl, vis/ and encoder.safetensors in %s",
                Path(cfg.output_dir).resolve(),
            )


def initial_weights(cfg: DictConfig, rank: int) -> str | None:
    """`train.init_from` for a fresh run; None (logged) when the run resumes from its own
    checkpoint, whose weights win."""
    from pixio.runtime.checkpoint_dir import has_checkpoints
    from pixio.runtime.rank0 import rank0_result

    path = cfg.train.init_from
    if path is not None and rank0_result(lambda: has_checkpoints(cfg.output_dir)):
        if rank == 0:
            log.info("train.init_from=%s ignored: the run resumes from its own checkpoint", path)
        return None
    return path


# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="pretrain", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, then run `main` through the configured launcher."""
    validate_and_launch(main, cfg, validate_pretrain)


if __name__ == "__main__":
    cli()
