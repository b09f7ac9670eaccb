"""Pixio pre-training entry point.

    python -m pretraining.train experiment=demo
    python -m pretraining.train model=vitl16 data.root=/data/in1k output_dir=outputs/l16
    python -m pretraining.train experiment=pretrain_vith16_imagenet data.root=... launcher=slurm

`main(cfg)` is the job itself (set up, build, run, close); `cli` validates the config and hands
`main` to the launcher (in-process, torchrun, or a SLURM job through submitit).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from pixio.models.registry import build_mae
from pixio.runtime.config import ConfigError, register_configs, to_container, validate_pretrain
from pixio.runtime.job import run_job
from pixio.runtime.launcher import launch
from pixio.runtime.loader import EpochLoader
from pixio.runtime.runconfig import check_resume
from pixio.runtime.trainer import Trainer
from pretraining.task import MAETask

log = logging.getLogger("pixio.pretrain")
register_configs()

# Keys that fix parameter shapes: a resume cannot change them.
SHAPE_KEYS = tuple(
    f"model.{k}"
    for k in ("name", "img_size", "n_cls_tokens", "embed_dim", "depth", "num_heads",
              "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
)  # fmt: skip


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


def build_data(cfg: DictConfig, rank: int, world_size: int) -> EpochLoader:
    """The webdataset stream of `data.*`, batched per process for the whole run."""
    from pixio.data import build_pretrain_dataset

    d = cfg.data
    root, json_root = d.root, d.json_root
    if d.build_demo:
        from pixio.data.demo import ensure_demo_data

        paths = ensure_demo_data(d.root)
        root, json_root = paths["shards"], paths["json_root"]
    dataset = build_pretrain_dataset(
        root, kind=d.kind, input_size=cfg.model.img_size, crop_scale=tuple(d.crop_scale),
        json_root=json_root, hist_thresh=d.hist_thresh, imgres_thresh=d.imgres_thresh,
        soft_sampling=d.soft_sampling, seed=cfg.train.seed, missing_json=d.missing_json,
        rank=rank, world_size=world_size, shuffle_buffer=d.shuffle_buffer,
        shuffle_buffer_mb=d.shuffle_buffer_mb, shard_interleave=d.shard_interleave,
        shard_list=d.shard_list,
    )  # fmt: skip
    pin = torch.cuda.is_available() and cfg.train.device != "cpu"
    t = cfg.train
    return EpochLoader(dataset, t.batch_size, d.num_workers, t.seed, t.iters_per_epoch, pin)


def main(cfg: DictConfig) -> None:
    """Pre-train one Pixio MAE: set up, build, run, close."""
    validate_pretrain(cfg)
    with run_job(cfg.output_dir, cfg.train.device) as info:
        config = to_container(cfg)
        check_resume(cfg.output_dir, config, SHAPE_KEYS)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        with torch.device("meta"):  # materialised (FSDP: shard by shard) by the trainer
            task = MAETask(build_model(cfg), cfg.model.mask_ratio)
        torch.manual_seed(cfg.train.seed + 1 + info.rank)  # different masks / drop path per rank
        data = build_data(cfg, info.rank, info.world_size)
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
    try:
        validate_pretrain(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    launch(main, cfg)


if __name__ == "__main__":
    cli()
