"""Pixio pre-training entry point.

    python -m pretraining.train experiment=demo
    python -m pretraining.train model=vitl16 data.root=/data/in1k output_dir=outputs/l16
    python -m pretraining.train experiment=pretrain_vith16_imagenet data.root=... launcher=slurm

`main(cfg)` is the job itself (set up, build, run, close); `cli` validates the config and hands
`main` to the launcher (in-process, torchrun, or a SLURM job through submitit).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from pixio.data.loader import build_data
from pixio.models.registry import build_mae
from pixio.runtime.config import to_container
from pixio.runtime.job import run_job
from pixio.runtime.launcher import validate_and_launch
from pixio.runtime.runconfig import check_resume
from pixio.runtime.trainer import Trainer
from pretraining.config import SHAPE_KEYS, register_configs, validate_pretrain
from pretraining.task import MAETask

log = logging.getLogger("pixio.pretrain")
register_configs()


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The Pixio MAE named by `model.*` (size overrides only where set)."""
    m = cfg.model
    sizes = {k: m[k] for k in ("embed_dim", "depth", "num_heads") if m[k] is not None}
    return build_mae(
        m.name, img_size=m.img_size, drop_path=m.drop_path, n_cls_tokens=m.n_cls_tokens,
        decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads, mask_grid=m.mask_grid,
        norm_pix_loss=m.norm_pix_loss, **sizes,
    )  # fmt: skip


def main(cfg: DictConfig) -> None:
    """Pre-train one Pixio MAE: set up, build, run, close."""
    validate_pretrain(cfg)
    with run_job(cfg.output_dir, cfg.train.device) as info:
        config = to_container(cfg)
        check_resume(cfg.output_dir, config, SHAPE_KEYS)
        # data mistakes stop before the model exists
        data = build_data(cfg.data, cfg.train, cfg.model.img_size, info.rank, info.world_size)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        with torch.device("meta"):  # materialised (FSDP: shard by shard) by the trainer
            task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim)
        torch.manual_seed(cfg.train.seed + 1 + info.rank)  # different masks / drop path per rank
        Trainer(cfg, task, data, info, config).fit()
        if info.rank == 0:
            log.info(
                "done: checkpoints, metrics.jsonl, vis/ and encoder.safetensors in %s",
                Path(cfg.output_dir).resolve(),
            )


# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="pretrain", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, then run `main` through the configured launcher."""
    validate_and_launch(main, cfg, validate_pretrain)


if __name__ == "__main__":
    cli()
