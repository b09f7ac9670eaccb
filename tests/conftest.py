"""Shared fixtures: tiny models and Hydra configs shrunk for CPU."""

from __future__ import annotations

import pytest
import torch
from tests_helpers import TINY, TINY_DECODER

import pixio


@pytest.fixture
def tiny_encoder() -> pixio.PixioEncoder:
    torch.manual_seed(0)
    return pixio.build_encoder("pixio_vitt16", **TINY).eval()


@pytest.fixture
def tiny_mae() -> pixio.PixioMAE:
    torch.manual_seed(0)
    return pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER)


# ---- Hydra configs ---------------------------------------------------------------------------
CONFIG_DIR = str((__import__("pathlib").Path(__file__).parents[1] / "configs").resolve())

# What every CPU test run shrinks: a tiny model, a short schedule, no tracker, no workers.
CPU_OVERRIDES = [
    "model=vitt16",
    "model.img_size=64",
    "model.mask_grid=2",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.decoder_embed_dim=32",
    "model.decoder_depth=1",
    "model.decoder_num_heads=2",
    "train.batch_size=4",
    "train.epochs=2",
    "train.iters_per_epoch=4",
    "train.save_every_iters=4",
    "train.log_every=1",
    "train.vis_every=0",
    "train.precision=fp32",
    "train.device=cpu",
    "optim.lr=1e-3",
    "optim.warmup_epochs=1",
    "logger=none",
    "launcher=local",
    "data.num_workers=0",
]


def compose_pretrain(overrides: list[str]):
    """Compose the real pre-training config (configs/pretrain.yaml) with overrides."""
    from hydra import compose, initialize_config_dir

    from pixio.runtime.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="pretrain", overrides=overrides)


@pytest.fixture
def cpu_config(tmp_path):
    """A composed pre-training config shrunk for CPU, writing under tmp_path."""

    def make(*extra: str):
        return compose_pretrain([*CPU_OVERRIDES, f"output_dir={tmp_path / 'run'}", "data.root=unused", *extra])

    return make
