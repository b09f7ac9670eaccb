"""The resume check: frozen keys (and everything inside a frozen dict) are refused with one line;
keys that older runs lack compare as the value they stood for; other changes pass."""

from __future__ import annotations

import pytest

from pixio.runtime.config import ConfigError
from pixio.runtime.runconfig import check_resume_config

FROZEN = ("encoder.source", "encoder.name", "encoder.model_kwargs")


def run_config(**encoder) -> dict:
    return {"encoder": {"name": "vit_mae", "source": "transformers", **encoder}, "train": {"lr": 1}}


def test_a_key_inside_a_frozen_dict_is_frozen():
    old = run_config(model_kwargs={"image_size": 224})
    with pytest.raises(ConfigError, match=r"^encoder.model_kwargs.image_size: ckpt was trained with 224; this run asks for 448"):  # fmt: skip
        check_resume_config(old, run_config(model_kwargs={"image_size": 448}), FROZEN, "ckpt")
    with pytest.raises(
        ConfigError, match=r"^encoder.model_kwargs.depth: ckpt was trained with None"
    ):
        check_resume_config(old, run_config(model_kwargs={"image_size": 224, "depth": 2}), FROZEN, "ckpt")  # fmt: skip
    # A key that merely starts like a frozen one is not inside it.
    changes = check_resume_config(old, {**old, "encoder": {**old["encoder"], "name_note": "x"}}, FROZEN, "ckpt")  # fmt: skip
    assert changes == [("encoder.name_note", None, "x")]


def test_a_key_older_runs_lack_stands_for_its_former_value():
    old = {"encoder": {"name": "pixio_vith16"}, "train": {"lr": 1}}  # saved before encoder.source
    new = {"encoder": {"name": "pixio_vith16", "source": "pixio"}, "train": {"lr": 1}}
    assert check_resume_config(old, new, FROZEN, "ckpt", {"encoder.source": "pixio"}) == []
    baseline = {"encoder": {"name": "pixio_vith16", "source": "timm"}, "train": {"lr": 1}}
    with pytest.raises(ConfigError, match="^encoder.source: ckpt was trained with None; this run asks for 'timm'"):  # fmt: skip
        check_resume_config(old, baseline, FROZEN, "ckpt", {"encoder.source": "pixio"})
    with pytest.raises(ConfigError, match="^encoder.source: "):  # without the note: refused
        check_resume_config(old, new, FROZEN, "ckpt")


FILES = {"encoder.sha256": "encoder.checkpoint"}


def eval_config(checkpoint: str | None, sha: str | None) -> dict:
    return {"encoder": {"name": "pixio_vith16", "checkpoint": checkpoint, "sha256": sha}}


def test_another_encoder_file_is_refused_and_a_moved_one_passes(caplog):
    old = eval_config("/ckpt/a.pth", "a" * 64)
    message = (
        r"^encoder.checkpoint: ckpt was trained with /ckpt/a.pth \(sha256 aaaaaaaaaaaaaaaa\); "
        r"this run has /ckpt/a.pth \(sha256 bbbbbbbbbbbbbbbb\)\. A resume cannot change the "
        r"weights the run was built on"
    )
    with pytest.raises(ConfigError, match=message):  # same path, rewritten file
        check_resume_config(old, eval_config("/ckpt/a.pth", "b" * 64), FROZEN, "ckpt", files=FILES)
    with pytest.raises(ConfigError, match=r"this run has random weights \(no file\)"):
        check_resume_config(old, eval_config("/absent", None), FROZEN, "ckpt", files=FILES)
    with pytest.raises(ConfigError, match=r"^encoder.checkpoint: ckpt was trained with random"):
        check_resume_config(eval_config("/absent", None), old, FROZEN, "ckpt", files=FILES)
    # Moved (same digest): allowed, logged as information only (nothing computed changes).
    caplog.set_level("INFO", logger="pixio.config")
    moved = check_resume_config(old, eval_config("/new/a.pth", "a" * 64), FROZEN, "ckpt", files=FILES)  # fmt: skip
    assert moved == [("encoder.checkpoint", "/ckpt/a.pth", "/new/a.pth")]
    assert [r.levelname for r in caplog.records] == ["INFO"]


def test_a_run_saved_before_digests_were_kept_resumes_with_a_warning(caplog):
    old = {"encoder": {"name": "pixio_vith16", "checkpoint": "/ckpt/a.pth"}}  # no sha256 key
    caplog.set_level("INFO", logger="pixio.config")
    changes = check_resume_config(old, eval_config("/ckpt/a.pth", "a" * 64), FROZEN, "ckpt", files=FILES)  # fmt: skip
    assert changes == [("encoder.sha256", None, "a" * 64)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "ckpt does not record encoder.sha256 (saved before file digests were kept): cannot check "
        "that encoder.checkpoint is the file it was trained with"
    ]


def test_site_paths_and_cpu_settings_change_quietly_on_resume(caplog):
    """A run saved before the `paths` group (or with other threads / peak) resumes with
    information lines only: machine settings do not change what is computed."""
    old = {"data": {"root": "/a"}, "train": {"cpu_threads": "auto", "peak_tflops": None}}
    new = {
        "data": {"root": "/a"},
        "paths": {"nyuv2": "/data/nyu", "kitti": None},
        "train": {"cpu_threads": 1, "peak_tflops": 989.0},
    }
    caplog.set_level("INFO", logger="pixio.config")
    changes = check_resume_config(old, new, FROZEN, "ckpt")
    assert {key for key, _, _ in changes} == {"paths.nyuv2", "train.cpu_threads", "train.peak_tflops"}  # fmt: skip
    assert {r.levelname for r in caplog.records} == {"INFO"}
