"""Machine settings in configs/local/ reach every app: the launcher settings of default.yaml,
and each dataset's root from paths.yaml (the `paths` group) into the app that reads that dataset
(pre-training and distillation: their shards, the k-NN monitor's folders), never another app's
`data.root`. Written into a copy of configs/ (the real configs/local is git-ignored and belongs
to the user)."""

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
# What a site sets now (README, "Machine paths"): launcher settings only; the roots in paths.yaml.
SITE_DEFAULT = "# @package _global_\nlauncher:\n  partition: site-gpu\n"


def site_configs(
    tmp_path: Path, paths: dict[str, str] | None = SITE_PATHS, default: str = LEGACY_DEFAULT
) -> str:
    """A copy of configs/ with configs/local/default.yaml and (unless None) paths.yaml."""
    root = Path(shutil.copytree(CONFIG_DIR, tmp_path / "configs", ignore=shutil.ignore_patterns("local")))  # fmt: skip
    (root / "local").mkdir()
    (root / "local" / "default.yaml").write_text(default)
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
        ("pretrain", [], SITE_PATHS["imagenet_wds"]),
        ("pretrain", ["data=web"], SITE_PATHS["web"]),
        ("pretrain", ["experiment=demo"], "data/demo"),  # the demo keeps its own shards
        ("distill", [], SITE_PATHS["imagenet_wds"]),
        ("distill", ["data=web"], SITE_PATHS["web"]),
        ("distill", ["experiment=distill_demo"], "data/demo"),
    ],
)
def test_local_settings_reach_every_app(tmp_path, app, overrides, root):
    cfg = compose_app(site_configs(tmp_path, default=SITE_DEFAULT), app, *overrides)
    assert cfg.launcher.partition == "site-gpu"
    assert cfg.data.root == root  # each app its own dataset, no shared root
    assert dict(cfg.paths) == SITE_PATHS


def test_the_pretraining_monitor_reads_the_imagenet_folders(tmp_path):
    cfg = compose_app(site_configs(tmp_path, default=SITE_DEFAULT), "pretrain", "monitor=imagenet")
    assert cfg.monitor.knn_root == SITE_PATHS["imagenet_folders"]
    assert cfg.data.root == SITE_PATHS["imagenet_wds"]


@pytest.mark.parametrize(
    "app, overrides, root",
    [
        ("eval_depth", [], SITE_PATHS["nyuv2"]),
        ("eval_knn", [], SITE_PATHS["imagenet_folders"]),
        # Pre-training and distillation read their data group before the local files: an older
        # default.yaml's data.root (their shards) still wins there, as it did before paths.yaml.
        ("pretrain", [], "/site/legacy-root"),
        ("distill", [], "/site/legacy-root"),
    ],
)
def test_an_older_site_file_with_one_data_root(tmp_path, app, overrides, root):
    cfg = compose_app(site_configs(tmp_path), app, *overrides)
    assert cfg.launcher.partition == "site-gpu"
    assert cfg.data.root == root  # the evaluation apps: their own dataset, not the shared root


def test_command_line_data_root_still_wins(tmp_path):
    configs = site_configs(tmp_path)
    assert compose_app(configs, "eval_depth", "data.root=/one/run").data.root == "/one/run"
    cfg = compose_app(configs, "eval_knn", "paths.imagenet_folders=/other")
    assert cfg.data.root == "/other"


def _validator(app: str):
    """The validation an app's entry runs (what `validate_and_launch` calls)."""
    from distillation.config import validate_distill
    from evaluation.common import validate_eval
    from evaluation.knn import validate_knn
    from pretraining.config import validate_pretrain

    apps = {"eval_knn": validate_knn, "pretrain": validate_pretrain, "distill": validate_distill}
    return apps.get(app, lambda c: validate_eval(c, app[5:]))


@pytest.mark.parametrize(
    "app, overrides, key, refers",
    [
        ("eval_depth", [], "nyuv2", "data.root"),
        ("eval_semseg", ["dataset=pascal"], "pascal", "data.root"),
        ("eval_knn", [], "imagenet_folders", "data.root"),
        ("pretrain", [], "imagenet_wds", "data.root"),
        ("pretrain", ["data=web"], "web", "data.root"),
        ("pretrain", ["monitor=imagenet", "data.root=/one/run"], "imagenet_folders", "monitor.knn_root"),
        ("distill", [], "imagenet_wds", "data.root"),
        ("distill", ["data=web"], "web", "data.root"),
    ],
)  # fmt: skip
def test_an_unset_path_is_one_line_naming_the_key(tmp_path, capsys, app, overrides, key, refers):
    validate = _validator(app)
    paths = {k: v for k, v in SITE_PATHS.items() if k != key}
    # pre-training and distillation: a site file of today's kind (an older one's data.root wins)
    default = LEGACY_DEFAULT if app.startswith("eval_") else SITE_DEFAULT
    cfg = compose_app(site_configs(tmp_path, paths, default), app, *overrides, f"output_dir={tmp_path / 'out'}")  # fmt: skip
    err = refusal(cfg, validate, capsys)
    assert err == (
        f"config error: paths.{key}: is not set ({refers} is ${{paths.{key}}}): put `{key}: "
        f"/your/path` in configs/local/paths.yaml, or give paths.{key}=... (or {refers}=... for "
        "this run)\n"
    )
    with pytest.raises(ConfigError, match=f"^paths.{key}: is not set"):
        validate(compose_app(CONFIG_DIR, app, *overrides, f"output_dir={tmp_path / 'out'}"))
