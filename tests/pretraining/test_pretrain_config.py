"""The Hydra configs: every group option and experiment composes and builds; bad values and
missing paths stop with one line naming the key (exit code 2), before any model is built; the
shared checks of pixio.runtime.config serve other jobs' configs too."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from config_helpers import UNKNOWN_EPOCH, refusal
from tests_helpers import CONFIG_DIR, compose_pretrain

from pixio.runtime.config import ConfigError
from pixio.runtime.launcher import launcher_config
from pixio.runtime.optim import resolve_lr
from pretraining.config import validate_pretrain
from pretraining.train import build_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def required(tmp_path) -> list[str]:
    """The keys every pre-training config needs: an existing (empty) data root, an output_dir."""
    (tmp_path / "shards").mkdir()
    return [f"data.root={tmp_path / 'shards'}", f"output_dir={tmp_path / 'out'}"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in ("model", "data", "optim", "train", "launcher", "logger", "monitor")
        for o in _options(g)
    ]
    # configs/experiment/ is shared by every app; pre-training's are `demo` and `pretrain_*`.
    + [
        f"experiment={e}"
        for e in _options("experiment")
        if e == "demo" or e.startswith("pretrain_")
    ],
)
def test_every_config_composes_validates_and_builds(override, required, tmp_path):
    if override == "experiment=pretrain_vit5b16_web":  # its filters read statistics
        (tmp_path / "json").mkdir()
        required = [*required, f"data.json_root={tmp_path / 'json'}"]
    if override == "monitor=imagenet":  # its knn_root is paths.imagenet_folders: class folders
        for split in ("train", "val"):
            (tmp_path / "imagenet" / split).mkdir(parents=True)
        required = [*required, f"paths.imagenet_folders={tmp_path / 'imagenet'}"]
    cfg = compose_pretrain([override, *required])
    validate_pretrain(cfg)
    launcher_config(cfg.launcher)
    with torch.device("meta"):  # full-size models without allocating memory
        model = build_model(cfg)
    assert model.patch_embed.proj.weight.shape[0] == model.embed_dim
    assert model.decoder_pred.out_features == 16 * 16 * 3


def test_reference_recipes_match_spec(required):
    h = compose_pretrain(["experiment=pretrain_vith16_imagenet", *required])
    g = compose_pretrain(["experiment=pretrain_vit5b16_web", *required])
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
    "overrides, key",
    [
        ("model.name=pixio_vitz16", "model.name"),
        ("model.img_size=200", "model.img_size"),  # not divisible by 16
        ("model.img_size=240", "model.img_size"),  # divisible by 16, not by 16 * 4
        ("model.mask_ratio=1.0", "model.mask_ratio"),
        ("model.mask_ratio=-0.1", "model.mask_ratio"),
        ("model.img_size=64", "model.mask_ratio"),  # one 4x4 group: 0.75 masks it
        ("model.img_size=128 model.mask_ratio=0.8", "model.mask_ratio"),  # 4 groups, none kept
        ("train.batch_size=0", "train.batch_size"),
        ("train.accum_iter=3", "train.save_every_iters"),  # 1000 is not a multiple of 3
        ("train.precision=fp8", "train.precision"),
        ("train.max_iters=0", "train.max_iters"),  # would export an untrained encoder
        ("train.max_iters=-1", "train.max_iters"),
        ("train.iters_per_epoch=0", "train.iters_per_epoch"),
        ("train.iters_per_epoch=null", "train.iters_per_epoch"),  # a stream has no length
        ("train.val_every=-1", "train.val_every"),
        ("train.vis_every=-5", "train.vis_every"),
        ("train.seed=-1", "train.seed"),
        ("data.kind=coco", "data.kind"),
        ("data.crop_scale=[0.8,0.2]", "data.crop_scale"),
        ("data.hist_thresh=4.5", "data.kind"),  # filters on imagenet tars
        ("data.kind=web data.soft_sampling=true", "data.json_root"),  # filters, no statistics
        ("data.build_demo=true", "data.kind"),  # the demo shards are web tars
        ("optim.lr=-1", "optim.lr"),
        ("optim.schedule=bogus", "optim.schedule"),
        ("optim.warmup_fraction=1.0", "optim.warmup_fraction"),
        ("optim.warmup_fraction=-0.1", "optim.warmup_fraction"),
        ("optim.poly_power=0", "optim.poly_power"),
        ("optim.betas=[0.9,1.5]", "optim.betas"),
        ("logger.mode=bogus", "logger.mode"),
        ("launcher.gpus=0", "launcher.gpus"),
    ],
)
def test_bad_value_names_the_key(overrides, key, required):
    cfg = compose_pretrain([*overrides.split(), *required])
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate_pretrain(cfg)


def test_warmup_fraction_replaces_warmup_epochs(required):
    """A short job (depth heads: 10 epochs, 10 % warmup) keeps the default warmup_epochs of 40."""
    cfg = compose_pretrain(["train.epochs=10", "optim.warmup_fraction=0.1", *required])
    validate_pretrain(cfg)
    cfg.optim.warmup_fraction = None
    with pytest.raises(ConfigError, match=r"^optim\.warmup_epochs: "):
        validate_pretrain(cfg)


def test_missing_data_root_names_the_key():
    # the data group's root is a site path (configs/paths/): the unset path is named
    cfg = compose_pretrain(["output_dir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"^paths\.imagenet_wds: is not set \(data\.root is"):
        validate_pretrain(cfg)
    cfg = compose_pretrain(["output_dir=/tmp/x", "data.root=???"])
    with pytest.raises(ConfigError, match=r"^data\.root: is required"):
        validate_pretrain(cfg)


# ---- paths: existence only, checked before anything is built --------------------------------
def _foreign(root: Path) -> None:
    root.mkdir()
    (root / "mine.tar").write_bytes(b"someone else's data")


def _demo(root: Path) -> None:
    (root / "shards").mkdir(parents=True)
    (root / ".complete").write_text("{}")


def _half_built_demo(root: Path) -> None:
    (root / ".build").mkdir(parents=True)
    (root / ".lock").touch()


BAD_PATHS = {
    "root missing": (["data.root={tmp}/nowhere"], "data.root"),
    "root a file": (["data.root={tmp}/file"], "data.root"),
    "json_root missing": (["data.kind=web", "data.json_root={tmp}/nowhere"], "data.json_root"),
    "json_root a file": (["data.kind=web", "data.json_root={tmp}/file"], "data.json_root"),
    "shard_list missing": (["data.shard_list={tmp}/list.txt"], "data.shard_list"),
    "demo in foreign root": (["data=demo", "data.root={tmp}/theirs"], "data.root"),
    "demo root a file": (["data=demo", "data.root={tmp}/file"], "data.root"),
}


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_bad_path_names_the_key(case, required, tmp_path):
    overrides, key = BAD_PATHS[case]
    (tmp_path / "file").write_text("")
    _foreign(tmp_path / "theirs")
    cfg = compose_pretrain([*required, *(o.format(tmp=tmp_path) for o in overrides)])
    with pytest.raises(ConfigError, match=rf"^{key}: {re.escape(str(tmp_path))}"):
        validate_pretrain(cfg)


@pytest.mark.parametrize("make", [None, Path.mkdir, _demo, _half_built_demo])
def test_demo_builds_in_an_absent_empty_or_demo_root(make, required, tmp_path):
    root = tmp_path / "demo"
    if make is not None:
        make(root)
    validate_pretrain(compose_pretrain([*required, "data=demo", f"data.root={root}"]))
    assert root.exists() == (make is not None)  # validation never creates it


def test_existing_paths_pass(required, tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "list.txt").write_text("a.tar\n")
    paths = [f"data.json_root={tmp_path / 'json'}", f"data.shard_list={tmp_path / 'list.txt'}"]
    validate_pretrain(compose_pretrain([*required, "data.kind=web", "data.hist_thresh=3", *paths]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.max_iters=0"], "train.max_iters"),
        (["data.json_root={tmp}/nowhere", "data.kind=web"], "data.json_root"),
        (["data=demo", "data.root={tmp}/theirs"], "data.root"),
        (["+train.epoch=1"], "train.epoch"),  # Hydra's own suggestion for `train.epoch=1`
    ],
)
def test_cli_refuses_in_one_line_with_exit_code_2(overrides, key, required, tmp_path):
    _foreign(tmp_path / "theirs")
    out = tmp_path / "out"
    args = [*required, *(o.format(tmp=tmp_path) for o in overrides)]
    cmd = [sys.executable, "-m", "pretraining.train", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"config error: {key}: ")
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())  # Hydra makes the run dir; nothing in it
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["mine.tar"]


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


# ---- data errors after validation -----------------------------------------------------------
def test_no_shards_and_bad_shard_list_are_config_errors(required, tmp_path):
    from pixio.data.loader import build_data

    cfg = compose_pretrain([*required, "data.num_workers=0"])  # an empty (existing) root
    with pytest.raises(ConfigError, match=r"^data\.root: no shard matching"):
        build_data(cfg.data, cfg.train, cfg.model.img_size, 0, 1)
    (tmp_path / "list.txt").write_text("gone.tar\n")
    cfg.data.shard_list = str(tmp_path / "list.txt")
    with pytest.raises(ConfigError, match=r"^data\.shard_list: shard list .*1 of 1 listed"):
        build_data(cfg.data, cfg.train, cfg.model.img_size, 0, 1)


# ---- the shared checks, on a job that is not pre-training -----------------------------------
def _other_job(**changes):
    """An evaluation-like config: only the shared groups, plus a head of its own."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from pixio.runtime.config import LauncherConfig, LoggerConfig, OptimConfig, TrainConfig

    cfg = OmegaConf.create(
        {
            "output_dir": "outputs/eval",
            "head": "???",
            "train": asdict(TrainConfig(epochs=10)),  # iters_per_epoch None: a finite dataset
            "optim": asdict(OptimConfig(schedule="poly", warmup_fraction=0.1)),
            "logger": asdict(LoggerConfig(name="none")),
            "launcher": asdict(LauncherConfig()),
        }
    )
    for dotted, value in changes.items():
        OmegaConf.update(cfg, dotted.replace("__", "."), value)
    return cfg


def test_shared_checks_work_on_another_jobs_config():
    from pixio.runtime.config import check_choice, require_set, validate_common

    validate_common(_other_job())  # warmup_epochs 40 > 10 epochs is fine: the fraction rules
    with pytest.raises(ConfigError, match=r"^head: is required"):
        require_set(_other_job(), "output_dir", "head")
    with pytest.raises(ConfigError, match=r"^eval\.head: must be one of dpt, linear"):
        check_choice(_other_job(head="mlp"), "eval", "head", ("dpt", "linear"))
    bad = {
        "train__max_iters": 0,
        "train__val_every": -1,
        "optim__schedule": "step",
        "optim__warmup_fraction": 1.0,
        "logger__name": "tensorboard",
        "launcher__gpus": 0,
        "output_dir": "???",
    }
    for dotted, value in bad.items():
        key = dotted.replace("__", ".")
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            validate_common(_other_job(**{dotted: value}))


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
    "script, dirs",
    [
        ("pretrain_vith16_imagenet.sh", ["DATA_ROOT"]),
        ("pretrain_vit5b16_web.sh", ["DATA_ROOT", "JSON_ROOT"]),
    ],
)
def test_recipe_scripts_pass_valid_overrides(script, dirs, tmp_path):
    import os

    paths = {name: tmp_path / name.lower() for name in dirs}  # validation wants them to exist
    for path in paths.values():
        path.mkdir()
    env = {**os.environ, "PYTHON": "echo", "PARTITION": "gpu", "ACCOUNT": "proj"}
    env.update({name: str(path) for name, path in paths.items()})
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / script), "train.epochs=100"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out[:2] == ["-m", "pretraining.train"]
    overrides = out[2:]
    assert {"launcher=slurm", "launcher.partition=gpu", "launcher.account=proj"} <= set(overrides)
    cfg = compose_pretrain(overrides)
    validate_pretrain(cfg)
    assert cfg.train.epochs == 100 and cfg.data.root == str(paths["DATA_ROOT"])
    assert cfg.launcher.nodes * cfg.launcher.gpus_per_node * cfg.train.batch_size in (8192, 16384)


@pytest.mark.parametrize(
    "override, line",
    [
        ("+train.epoch=1", UNKNOWN_EPOCH),
        ("++train.epoch=1", UNKNOWN_EPOCH),
        ("+model.drop_pth=0.1", "config error: model.drop_pth: unknown key (a '+' override adds it, but nothing reads it); did you mean model.drop_path?\n"),
        ("+seed=1", "config error: seed: unknown key (a '+' override adds it, but nothing reads it); the keys of the config are paths, model, data, optim, train, monitor, launcher, logger, output_dir\n"),
    ],
)  # fmt: skip
def test_keys_the_schema_lacks_are_refused_even_with_plus(override, line, required, capsys):
    # Hydra opens the structured group for a `+` override: the key composes, nothing reads it.
    cfg = compose_pretrain([*required, override])
    assert refusal(cfg, validate_pretrain, capsys) == line
