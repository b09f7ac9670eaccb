"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

import torch

TINY = dict(embed_dim=64, depth=3, num_heads=4)
TINY_DECODER = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---- Hydra configs ---------------------------------------------------------------------------
CONFIG_DIR = str((Path(__file__).parents[1] / "configs").resolve())

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

    from pretraining.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="pretrain", overrides=overrides)
