"""Baselines in the evaluation harness: a one-epoch depth run on a tiny transformers ViTMAE
(patch 14) and a k-NN run on a tiny timm ViT-Hybrid (ResNet stem + ViT) complete and record the
encoder, its architecture and the protocol's sizes; configuration and checkpoint mistakes are
one-line errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from app_helpers import (
    compose_eval,
    cpu_overrides,
    knn_config,
    make_folder,
    read_json,
    run_knn_app,
    small_demo,
)
from baseline_helpers import TINY_TIMM, save_hf_folder, save_timm_weights, tiny_timm

from evaluation.common import validate_eval
from evaluation.depth import main as depth_main
from evaluation.knn import global_features
from evaluation.knn_job import image_folders
from pixio.runtime import checkpointing
from pixio.runtime.config import ConfigError
from pixio.runtime.prefetch import normalize_images

HYBRID = "vit_base_r50_s16_224"


def baseline_overrides(source: str, name: str, checkpoint, root, out, **extra) -> list[str]:
    """The CPU app overrides with a baseline encoder instead of the tiny Pixio one."""
    pixio_keys = ("encoder.name=", "encoder.checkpoint=", "encoder.embed_dim=", "encoder.depth=", "encoder.num_heads=")  # fmt: skip
    base = [o for o in cpu_overrides(checkpoint, root, out, **extra) if not o.startswith(pixio_keys)]  # fmt: skip
    return [*base, f"encoder.source={source}", f"encoder.name={name}", f"encoder.checkpoint={checkpoint}"]  # fmt: skip


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    return save_hf_folder("vit_mae", tmp_path_factory.mktemp("mae") / "vit_mae_tiny", seed=5)


@pytest.mark.slow
def test_one_epoch_depth_run_on_a_transformers_vit_mae(mae_folder, tmp_path):
    root = small_demo("kitti", tmp_path / "kitti")
    out = tmp_path / "run"
    # Null sizes, as a user leaves them: patch 14 gives crop and window 252, stride 168 (the
    # small demo images are padded to the crop, and fit in one window).
    extra = {"dataset": "kitti", "head": "linear", "train.epochs": 1, "train.batch_size": 4,
             "data.crop_size": "null", "eval.window": "null", "eval.stride": "null"}  # fmt: skip
    depth_main(compose_eval("depth", baseline_overrides("transformers", "vit_mae", mae_folder, root, out, **extra)))  # fmt: skip
    results = read_json(out / "results.json")
    assert results["protocol"] == {"patch_size": 14, "crop_size": 252, "window": 252, "stride": 168,
                                   "reference": {"crop_size": 256, "window": 256, "stride": 170},
                                   "as_reference": False, "tta": {"mode": "none", "reference": "none"}}  # fmt: skip
    enc = results["encoder"]
    assert (enc["source"], enc["name"], enc["checkpoint"]) == ("transformers", "vit_mae", str(mae_folder))  # fmt: skip
    assert len(enc["sha256"]) == 64
    arch = results["architecture"]
    assert (arch["model"], arch["patch_size"], arch["embed_dim"], arch["depth"], arch["n_cls_tokens"]) == ("ViTMAEModel", 14, 32, 4, 1)  # fmt: skip
    assert [e["epoch"] for e in results["epochs"]] == [1.0] and 0 <= results["final"]["d1"] <= 100
    # The linear head reads 2 x 32 channels (patch tokens + the class token), 1 output.
    head = checkpointing.load_checkpoint(out / "checkpoint-last", ("model",))["model"]["head"]
    assert tuple(head["1.weight"].shape) == (1, 64, 1, 1)


@pytest.fixture(scope="module")
def hybrid_knn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid_knn")
    weights = save_timm_weights(HYBRID, tmp / "hybrid.pth", seed=2, num_classes=7)
    data = make_folder(tmp / "data", {"train": 4, "val": 2})
    kwargs = ",".join(f"{k}:{v}" for k, v in TINY_TIMM[HYBRID].items())
    args = [
        "encoder.source=timm", f"encoder.name={HYBRID}", f"encoder.checkpoint={weights}",
        f"+encoder.model_kwargs={{{kwargs}}}", f"data.root={data}", "data.resize=32",
        "data.num_workers=0", "knn.k=[1,3]", "train.batch_size=4", "train.device=cpu",
        "train.precision=fp32", "logger=none", "knn.save_features=true",
    ]  # fmt: skip
    return tmp, weights, data, args


@pytest.fixture(scope="module")
def hybrid_knn_run(hybrid_knn):
    tmp, _, _, args = hybrid_knn
    proc = run_knn_app(*args, "data.crop=32", f"output_dir={tmp / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


@pytest.mark.slow
def test_knn_run_on_a_timm_vit_hybrid_matches_in_process_features(hybrid_knn, hybrid_knn_run):
    tmp, weights, data, args = hybrid_knn
    record = json.loads((tmp / "out" / "results.json").read_text())
    assert (record["encoder"]["name"], record["encoder"]["source"]) == (HYBRID, "timm")
    assert record["protocol"] == {"patch_size": 16, "resize": 32, "crop": 32,
                                  "reference": {"resize": 256, "crop": 256}, "as_reference": False}  # fmt: skip
    assert record["architecture"]["mean"] == [0.5, 0.5, 0.5] and record["feature_dim"] == 32
    # The app's features are the class token of the hybrid loaded from the file, in-process.
    encoder = tiny_timm(HYBRID, seed=0)
    encoder.model.load_state_dict(encoder.read_state(str(weights)))
    train_set, val_set = image_folders(data, 32, 32)
    saved = torch.load(tmp / "out" / "features.pt")
    with torch.no_grad():
        for key, dataset in (("train", train_set), ("val", val_set)):
            expected = global_features(
                encoder, normalize_images(torch.stack([s[0] for s in dataset]))
            )
            torch.testing.assert_close(saved[key], expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_processes_receive_the_baseline_by_broadcast(hybrid_knn, hybrid_knn_run):
    # Rank 1 builds the hybrid on the meta device and reads nothing: rank 0's weights arrive by
    # broadcast, so both ranks' features (and the results) equal the one-process run's.
    tmp, _, _, args = hybrid_knn
    two = run_knn_app(*args, "data.crop=32", f"output_dir={tmp / 'two'}", "launcher.gpus=2", timeout=180)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one, other = (torch.load(d / "features.pt") for d in (hybrid_knn_run, tmp / "two"))
    for key in ("train", "val"):
        torch.testing.assert_close(other[key], one[key], rtol=0, atol=1e-5)
    a, b = (json.loads((d / "results.json").read_text()) for d in (hybrid_knn_run, tmp / "two"))
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_a_one_line_error(hybrid_knn):
    tmp, weights, _, args = hybrid_knn
    deeper = [a if not a.startswith("+encoder.model_kwargs=") else a.replace("depth:4", "depth:5") for a in args]  # fmt: skip
    proc = run_knn_app(*deeper, f"output_dir={tmp / 'deeper'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"config error: encoder.checkpoint: {weights} does not match the encoder: missing keys ['blocks.4.")  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["encoder.source=hub"], "^encoder.source: "),
        (
            ["encoder.source=transformers", "encoder.name=vit_hybrid"],
            "^encoder.name: unknown transformers model 'vit_hybrid'",
        ),  # fmt: skip
        (
            ["encoder.source=timm", "encoder.name=vit_bse_patch16_224"],
            "^encoder.name: unknown timm model",
        ),  # fmt: skip
        (
            ["encoder.source=timm", f"encoder.name={HYBRID}", "encoder.depth=4"],
            "^encoder.depth: applies to encoder.source=pixio only",
        ),  # fmt: skip
        (["+encoder.model_kwargs={depth:4}"], "^encoder.model_kwargs: applies to baselines"),
        (
            [
                "encoder.source=timm",
                f"encoder.name={HYBRID}",
                "+encoder.model_kwargs.embed_dimm=32",
            ],
            f"^encoder.model_kwargs: timm model '{HYBRID}' does not take these arguments",
        ),  # fmt: skip
        (
            [
                "encoder.source=timm",
                f"encoder.name={HYBRID}",
                "encoder.img_size=64",
                "+encoder.model_kwargs.img_size=32",
            ],  # fmt: skip
            "^encoder.img_size: is also set in encoder.model_kwargs.img_size",
        ),  # fmt: skip
        (
            [
                "encoder.source=transformers",
                "encoder.name=vit",
                "encoder.random_if_missing=true",
                "encoder.checkpoint=/absent",
                "+encoder.model_kwargs.hiden_size=8",
            ],
            "^encoder.model_kwargs: ViTConfig has no field 'hiden_size'",
        ),  # fmt: skip
        (
            [
                "encoder.source=transformers",
                "encoder.name=vit_mae",
                "encoder.random_if_missing=true",
                "encoder.checkpoint=/absent",
                "+encoder.model_kwargs={patch_size:14}",
                "data.crop_size=64",
            ],
            r"^data.crop_size: 64 is not a positive multiple of the encoder's patch size 14 \(null picks 252\)",
        ),  # fmt: skip
    ],
)
def test_baseline_config_errors_name_the_key(overrides, message, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "enc.pth").write_bytes(b"")
    base = [f"data.root={tmp_path / 'data'}", f"encoder.checkpoint={tmp_path / 'enc.pth'}"]
    with pytest.raises(ConfigError, match=message):
        validate_eval(compose_eval("depth", [*base, *overrides]), "depth")


def test_a_folder_of_another_family_and_a_crop_off_the_patch_grid_are_refused(mae_folder, tmp_path):
    (tmp_path / "data").mkdir()
    base = [f"data.root={tmp_path / 'data'}", f"encoder.checkpoint={mae_folder}", "encoder.source=transformers"]  # fmt: skip
    with pytest.raises(ConfigError, match=f"^encoder.checkpoint: {mae_folder} holds a 'vit_mae' model, not 'dinov2'"):  # fmt: skip
        validate_eval(compose_eval("depth", [*base, "encoder.name=dinov2"]), "depth")
    cfg = compose_eval("depth", [*base, "encoder.name=vit_mae", "eval.window=64"])
    with pytest.raises(ConfigError, match=r"^eval.window: 64 is not a positive multiple of the encoder's patch size 14 \(null picks 252\)"):  # fmt: skip
        validate_eval(cfg, "depth")
    cfg = compose_eval("depth", [*base, "encoder.name=vit_mae"])
    validate_eval(cfg, "depth")  # null sizes: 252 / 252 / 168 for patch 14


BASELINES = {  # experiment -> (source, name, patch, width, depth, DPT blocks)
    "baseline_mae_vith14": ("transformers", "vit_mae", 14, 1280, 32, [7, 15, 23, 31]),
    "baseline_dinov2_vitl14": ("transformers", "dinov2", 14, 1024, 24, [5, 11, 17, 23]),
    "baseline_vit_b16": ("transformers", "vit", 16, 768, 12, [2, 5, 8, 11]),
    "baseline_vit_hybrid_b16": ("timm", "vit_base_r50_s16_384", 16, 768, 12, [2, 5, 8, 11]),
}
# config.json of the released folders the experiments name (facebook/vit-mae-huge,
# facebook/dinov2-large, google/vit-base-patch16-224-in21k): what validation reads of them.
# fmt: off
RELEASED = {  # name -> (hidden_size, num_hidden_layers, num_attention_heads, patch_size)
    "vit_mae": (1280, 32, 16, 14), "dinov2": (1024, 24, 16, 14), "vit": (768, 12, 12, 16),
}
# fmt: on


def released_config(name: str) -> dict[str, int]:
    width, depth, heads, patch = RELEASED[name]
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch)  # fmt: skip


def test_every_baseline_experiment_composes_for_every_app_and_builds_on_meta(tmp_path):
    from hydra import compose, initialize_config_dir

    from evaluation.features import build_meta_encoder
    from evaluation.heads import head_block_ids
    from evaluation.knn import CONFIG_DIR
    from evaluation.knn import register_configs as register_knn
    from pixio.models.baselines.transformers_vit import model_class

    found = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("baseline_*.yaml"))
    assert found == sorted(BASELINES)
    register_knn()
    for experiment, (source, name, patch, width, depth, dpt) in BASELINES.items():
        folder = tmp_path / name
        if source == "transformers":  # only config.json: validation never reads weights
            folder.mkdir()
            model_class(name).config_class(**released_config(name)).to_json_file(
                folder / "config.json"
            )
        args = [f"experiment={experiment}", f"data.root={tmp_path}", f"encoder.checkpoint={folder}"]
        configs = [compose_eval(app, args) for app in ("depth", "semseg")]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            configs.append(compose("eval_knn", args))
        for cfg in configs:
            assert (cfg.encoder.source, cfg.encoder.name) == (source, name)
            encoder = build_meta_encoder(cfg.encoder)  # the architecture, no memory
            assert (encoder.patch_size, encoder.embed_dim, encoder.depth) == (patch, width, depth)
            assert head_block_ids("dpt", encoder.depth) == dpt


def test_transformers_folder_without_a_name_takes_its_model_type(mae_folder, tmp_path):
    # No encoder.name (the apps' default is the Pixio pixio_vith16): the folder's config.json
    # says vit_mae, which the run then records and builds.
    from evaluation.knn import validate_knn

    sizes = {"data.crop_size": 56, "eval.window": 56}  # patch 14
    overrides = baseline_overrides("transformers", "x", mae_folder, tmp_path, tmp_path / "o", **sizes)  # fmt: skip
    base = [o for o in overrides if not o.startswith("encoder.name=")]
    cfg = compose_eval("depth", base)
    assert cfg.encoder.name == "pixio_vith16"  # what the configs leave there
    assert validate_eval(cfg, "depth") == 14 and cfg.encoder.name == "vit_mae"
    assert cfg.output_dir == str(tmp_path / "o")
    with pytest.raises(ConfigError, match=rf"^encoder.name: unknown transformers model 'vitmae': .*; {mae_folder}/config.json says 'vit_mae': leave encoder.name out"):  # fmt: skip
        validate_eval(compose_eval("depth", [*base, "encoder.name=vitmae"]), "depth")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    knn = knn_config(tmp_path, "encoder.source=transformers", f"encoder.checkpoint={mae_folder}")
    validate_knn(knn)
    assert knn.encoder.name == "vit_mae" and knn.output_dir == str(tmp_path / "out")


def test_transformers_family_comes_from_the_folder_in_the_library(mae_folder, tmp_path):
    from pixio.models.baselines import BaselineError, build_baseline
    from pixio.models.baselines.transformers_vit import resolve_family

    assert build_baseline("transformers", None, str(mae_folder)).name == "vit_mae"
    assert resolve_family("dinov2", None) == "dinov2"
    with pytest.raises(BaselineError, match=r"is needed: no folder to read the family from"):
        resolve_family(None, None)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(BaselineError, match=rf"^{other} holds a 'bert' model \(config.json model_type\), not one of vit, vit_mae"):  # fmt: skip
        resolve_family(None, str(other))
