"""What the depth / segmentation apps may write where: random weights only in the demos, and an
output_dir holding another run's results (a k-NN's, another dataset's, another encoder's) is
refused before anything is built; a re-run of the same run passes."""

from __future__ import annotations

import json

import pytest
from app_helpers import TINY_ENCODER, compose_eval, cpu_overrides, fake_run

from evaluation.common import check_output_owner, validate_eval
from pixio import build_encoder, save_encoder
from pixio.runtime.config import ConfigError


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "data").mkdir()
    save_encoder(build_encoder("pixio_vitt16", **TINY_ENCODER), tmp_path / "enc.safetensors")
    return tmp_path / "enc.safetensors", tmp_path / "data", tmp_path / "out"


def test_random_weights_only_in_the_demos(paths, tmp_path):
    _, data, out = paths
    missing = tmp_path / "typo.safetensors"
    cfg = compose_eval("depth", cpu_overrides(missing, data, out, **{"encoder.random_if_missing": True}))  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^encoder.checkpoint: not found: {missing} \(random weights, encoder.random_if_missing, are for the demo experiments only"):  # fmt: skip
        validate_eval(cfg, "depth")
    cfg = compose_eval("depth", ["experiment=depth_demo", *cpu_overrides(missing, data, out)])
    assert cfg.encoder.random_if_missing and cfg.data.build_demo
    validate_eval(cfg, "depth")  # the demo: allowed (and recorded as random_weights)


def test_an_output_dir_holding_another_runs_results_is_refused(paths):
    checkpoint, data, out = paths
    cfg = compose_eval("depth", cpu_overrides(checkpoint, data, out, dataset="kitti"))
    fake_run(out, "depth", "nyuv2", "dpt", [90.0])
    with pytest.raises(ConfigError, match=rf"^output_dir: {out} holds the results of another run \(results.json: depth nyuv2 dpt of pixio_vith16 \(sha256 abababababababab\)\); this run \(depth kitti dpt of pixio_vitt16\) would replace them"):  # fmt: skip
        validate_eval(cfg, "depth")
    knn = {
        "task": "knn",
        "top1": {"10": 50.0},
        "encoder": "pixio_vitt16",
        "checkpoint_sha256": "ab" * 32,
    }
    (out / "results.json").write_text(json.dumps(knn))
    with pytest.raises(
        ConfigError,
        match=r"\(results.json: k-NN of pixio_vitt16 \(sha256 abababababababab\)\); this run",
    ):
        validate_eval(cfg, "depth")
    # Its own earlier result (same task, dataset, head, encoder): validation passes, and at the
    # start the checkpoint's digest decides.
    (out / "results.json").unlink()
    fake_run(out / "own", "depth", "kitti", "dpt", [90.0], name="pixio_vitt16")
    (out / "own" / "results.json").rename(out / "results.json")
    validate_eval(cfg, "depth")
    check_output_owner(cfg, "depth", sha256="ab" * 32)
    with pytest.raises(ConfigError, match=r"this run \(depth kitti dpt of pixio_vitt16 \(sha256 cdcdcdcdcdcdcdcd\)\) would replace them"):  # fmt: skip
        check_output_owner(cfg, "depth", sha256="cd" * 32)


def test_an_unreadable_encoder_file_is_one_config_error(tmp_path):
    bad = tmp_path / "enc.safetensors"
    bad.write_bytes(b"")  # e.g. a copy cut short
    (tmp_path / "data").mkdir()
    cfg = compose_eval("depth", cpu_overrides(bad, tmp_path / "data", tmp_path / "out"))
    with pytest.raises(ConfigError, match=rf"^encoder.checkpoint: {bad}: not a readable safetensors"):  # fmt: skip
        validate_eval(cfg, "depth")
