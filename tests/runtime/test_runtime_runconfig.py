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
