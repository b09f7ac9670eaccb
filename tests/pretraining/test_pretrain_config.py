"""The Hydra configs: every group option and experiment composes and builds; bad values stop
with one line naming the key, before any model is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests_helpers import CONFIG_DIR, compose_pretrain

from pixio.runtime.config import ConfigError, validate_pretrain
from pixio.runtime.launcher import launcher_config
from pixio.runtime.optim import resolve_lr
from pretraining.train import build_model

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["data.root=/shards", "output_dir=/tmp/pixio-unused"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in ("model", "data", "optim", "train", "launcher", "logger")
        for o in _options(g)
    ]
    + [f"experiment={e}" for e in _options("experiment")],
)
def test_every_config_composes_validates_and_builds(override):
    cfg = compose_pretrain([override, *REQUIRED])
    validate_pretrain(cfg)
    launcher_config(cfg.launcher)
    with torch.device("meta"):  # full-size models without allocating memory
        model = build_model(cfg)
    assert model.patch_embed.proj.weight.shape[0] == model.embed_dim
    assert model.decoder_pred.out_features == 16 * 16 * 3


def test_reference_recipes_match_spec():
    h = compose_pretrain(["experiment=pretrain_vith16_imagenet", *REQUIRED])
    g = compose_pretrain(["experiment=pretrain_vit5b16_web", *REQUIRED])
    for cfg, nodes, epochs, warmup, blr in ((h, 16, 400, 40, 2.5e-5), (g, 32, 800, 80, 1.25e-5)):
        assert cfg.launcher.nodes * cfg.launcher.gpus_per_node == nodes * 8
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.iters_per_epoch) == (
            64,
            epochs,
            1605,
        )
        assert (cfg.optim.warmup_epochs, cfg.optim.blr, cfg.model.drop_path) == (warmup, blr, 0.4)
        assert (cfg.model.mask_ratio, cfg.model.mask_grid, cfg.model.n_cls_tokens) == (0.75, 4, 8)
        assert cfg.train.precision == "bf16" and cfg.launcher.cpus_per_task == 10
    global_batch = 64 * h.launcher.nodes * h.launcher.gpus_per_node
    assert global_batch == 8192 and resolve_lr(None, h.optim.blr, global_batch) == 2.5e-5 * 32
    assert (g.data.hist_thresh, g.data.imgres_thresh, g.data.soft_sampling) == (4.5, 320, True)
    assert g.data.kind == "web" and h.data.kind == "imagenet"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.name=pixio_vitz16", "model.name"),
        ("model.img_size=200", "model.img_size"),  # not divisible by 16
        ("model.img_size=240", "model.img_size"),  # divisible by 16, not by 16 * 4
        ("model.mask_ratio=1.0", "model.mask_ratio"),
        ("model.mask_ratio=-0.1", "model.mask_ratio"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.accum_iter=3", "train.save_every_iters"),  # 1000 is not a multiple of 3
        ("train.precision=fp8", "train.precision"),
        ("data.kind=coco", "data.kind"),
        ("optim.lr=-1", "optim.lr"),
        ("launcher.gpus=0", "launcher.gpus"),
    ],
)
def test_bad_value_names_the_key(override, key):
    cfg = compose_pretrain([override, *REQUIRED])
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate_pretrain(cfg)


def test_missing_data_root_names_the_key():
    cfg = compose_pretrain(["output_dir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"^data\.root: is required"):
        validate_pretrain(cfg)


def test_cli_stops_with_one_line_before_building_anything(tmp_path):
    out = tmp_path / "never"
    cmd = [
        sys.executable,
        "-m",
        "pretraining.train",
        "model.img_size=200",
        "data.root=/x",
        f"output_dir={out}",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("config error: model.img_size: 200")
    assert not (out / "checkpoint-last").exists()


def test_local_machine_config_is_picked_up_and_demo_keeps_its_root(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir

    configs = shutil.copytree(
        CONFIG_DIR, tmp_path / "configs", ignore=shutil.ignore_patterns("local")
    )
    (configs / "local").mkdir()
    (configs / "local" / "default.yaml").write_text(
        "# @package _global_\ndata:\n  root: /datasets/in1k\nlauncher:\n  partition: gpu\n"
    )
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        plain = compose(config_name="pretrain", overrides=["output_dir=/tmp/x"])
        demo = compose(config_name="pretrain", overrides=["experiment=demo"])
    assert (plain.data.root, plain.launcher.partition) == ("/datasets/in1k", "gpu")
    assert (demo.data.root, demo.launcher.partition) == ("data/demo", "gpu")


@pytest.mark.parametrize(
    "script, env",
    [
        ("pretrain_vith16_imagenet.sh", {"DATA_ROOT": "/d"}),
        ("pretrain_vit5b16_web.sh", {"DATA_ROOT": "/d", "JSON_ROOT": "/j"}),
    ],
)
def test_recipe_scripts_pass_valid_overrides(script, env, tmp_path):
    import os

    env = {**os.environ, **env, "PYTHON": "echo", "PARTITION": "gpu", "ACCOUNT": "proj"}
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / script), "train.epochs=100"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out[:2] == ["-m", "pretraining.train"]
    overrides = out[2:]
    assert {"launcher=slurm", "launcher.partition=gpu", "launcher.account=proj"} <= set(overrides)
    cfg = compose_pretrain(overrides)
    validate_pretrain(cfg)
    assert cfg.train.epochs == 100 and cfg.data.root == "/d"
    assert cfg.launcher.nodes * cfg.launcher.gpus_per_node * cfg.train.batch_size in (8192, 16384)
