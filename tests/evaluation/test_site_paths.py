"""Machine settings in configs/local/ reach every app: the launcher settings of default.yaml,
and each dataset's root from paths.yaml (the `paths` group) into the app that reads that dataset,
never another app's `data.root`. Written into a copy of configs/ (the real configs/local is
git-ignored and belongs to the user)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from config_helpers import refusal
from tests_helpers import CONFIG_DIR

from pixio.runtime.config import ConfigError

SITE_PATHS = {
    "imagenet_wds": "/site/imagenet-wds", "imagenet_folders": "/site/imagenet",
    "web": "/site/web", "nyuv2": "/site/nyuv2", "kitti": "/site/kitti", "ade20k": "/site/ade",
    "pascal": "/site/VOC2012", "loveda": "/site/loveda",
}  # fmt: skip
# What a site set before per-dataset paths: one data.root for everything (the pre-training shards).
LEGACY_DEFAULT = "# @package _global_\ndata:\n  root: /site/legacy-root\nlauncher:\n  partition: site-gpu\n"  # fmt: skip


def site_configs(tmp_path: Path, paths: dict[str, str] | None = SITE_PATHS) -> str:
    """A copy of configs/ with configs/local/default.yaml and (unless None) paths.yaml."""
    root = Path(shutil.copytree(CONFIG_DIR, tmp_path / "configs", ignore=shutil.ignore_patterns("local")))  # fmt: skip
    (root / "local").mkdir()
    (root / "local" / "default.yaml").write_text(LEGACY_DEFAULT)
    if paths is not None:
        lines = "".join(f"{k}: {v}\n" for k, v in paths.items())
        (root / "local" / "paths.yaml").write_text(f"# configs/local/paths.yaml\n{lines}")
    return str(root)


def compose_app(config_dir: str, app: str, *overrides: str):
    """The composed config of one app's entry config, its schema registered as the app does."""
    from hydra import compose, initialize_config_dir

    if app == "pretrain":
        from pretraining.config import register_configs
    elif app == "distill":
        from distillation.config import register_configs
    elif app == "eval_knn":
        from evaluation.knn import register_configs
    else:
        from evaluation.common import register_configs
    register_configs()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name=app, overrides=list(overrides))


@pytest.mark.parametrize(
    "app, overrides, root",
    [
        ("eval_depth", [], SITE_PATHS["nyuv2"]),
        ("eval_depth", ["dataset=kitti"], SITE_PATHS["kitti"]),
        ("eval_semseg", [], SITE_PATHS["ade20k"]),
        ("eval_semseg", ["dataset=pascal"], SITE_PATHS["pascal"]),
        ("eval_semseg", ["dataset=loveda"], SITE_PATHS["loveda"]),
        ("eval_knn", [], SITE_PATHS["imagenet_folders"]),
        # Pre-training and distillation read data.root of default.yaml (their schemas have no
        # `paths` group yet: docs/evaluation.md, "Machine paths").
        ("pretrain", [], "/site/legacy-root"),
        ("distill", [], "/site/legacy-root"),
    ],
)
def test_local_settings_reach_every_app(tmp_path, app, overrides, root):
    cfg = compose_app(site_configs(tmp_path), app, *overrides)
    assert cfg.launcher.partition == "site-gpu"
    assert cfg.data.root == root  # the evaluation apps: their own dataset, not the shared root
    if app.startswith("eval_"):
        assert dict(cfg.paths) == SITE_PATHS


def test_command_line_data_root_still_wins(tmp_path):
    configs = site_configs(tmp_path)
    assert compose_app(configs, "eval_depth", "data.root=/one/run").data.root == "/one/run"
    cfg = compose_app(configs, "eval_knn", "paths.imagenet_folders=/other")
    assert cfg.data.root == "/other"


@pytest.mark.parametrize(
    "app, overrides, key",
    [
        ("eval_depth", [], "nyuv2"),
        ("eval_semseg", ["dataset=pascal"], "pascal"),
        ("eval_knn", [], "imagenet_folders"),
    ],  # fmt: skip
)
def test_an_unset_path_is_one_line_naming_the_key(tmp_path, capsys, app, overrides, key):
    from evaluation.common import validate_eval
    from evaluation.knn import validate_knn

    paths = {k: v for k, v in SITE_PATHS.items() if k != key}
    cfg = compose_app(site_configs(tmp_path, paths), app, *overrides, f"output_dir={tmp_path / 'out'}")  # fmt: skip
    validate = validate_knn if app == "eval_knn" else lambda c: validate_eval(c, app[5:])
    err = refusal(cfg, validate, capsys)
    assert err == (
        f"config error: paths.{key}: is not set (data.root is ${{paths.{key}}}): put `{key}: "
        f"/your/path` in configs/local/paths.yaml, or give paths.{key}=... (or data.root=... for "
        "this run)\n"
    )
    with pytest.raises(ConfigError, match=f"^paths.{key}: is not set"):
        validate(compose_app(CONFIG_DIR, app, *overrides, f"output_dir={tmp_path / 'out'}"))
