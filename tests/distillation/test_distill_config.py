"""Distillation's config: every experiment composes and validates; mistakes are refused with
the key named, before anything is built; the CLI says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from config_helpers import UNKNOWN_EPOCH, refusal
from distill_helpers import compose_distill

from distillation.config import shape_keys, validate_distill
from distillation.train import ensure_demo_teacher
from pixio.runtime.config import ConfigError, check_known_keys

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("distill_*.yaml"))


def test_the_reference_experiments_and_the_demo_exist():
    assert "distill_demo" in EXPERIMENTS
    assert len([e for e in EXPERIMENTS if e.startswith("distill_vit5b16_to_")]) == 4


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path, teacher_path):
    (tmp_path / "json").mkdir()
    demo = experiment == "distill_demo"  # its teacher and data are made when missing
    paths = [f"output_dir={tmp_path / 'out'}"]
    if demo:
        paths += [f"data.root={tmp_path / 'demo_data'}"]
    else:
        paths += [f"teacher.checkpoint={teacher_path}", f"data.root={tmp_path}"]
        paths += [f"data.json_root={tmp_path / 'json'}"]
    cfg = compose_distill([f"experiment={experiment}", *paths])
    validate_distill(cfg, teacher_may_be_missing=demo)
    assert cfg.teacher.build_demo == demo
    assert cfg.optim.lr == 1e-3 and list(cfg.optim.betas) == [0.9, 0.95]
    if experiment.startswith("distill_vit5b16_to_vit1b16"):
        assert list(cfg.students) == ["pixio_vit1b16", "pixio_vith16"]
        assert (cfg.mask_ratio, cfg.student.drop_path) == (0.5, 0.4)
    if experiment.startswith("distill_vit5b16_to_vitl16"):
        assert list(cfg.students) == ["pixio_vitl16", "pixio_vitb16"]
        assert (cfg.mask_ratio, cfg.student.drop_path) == (0.0, 0.1)
    if experiment != "distill_demo":
        assert cfg.teacher.name == "pixio_vit5b16" and cfg.train.batch_size == 64
        assert cfg.launcher.nodes * cfg.launcher.gpus_per_node == 128
        assert (cfg.train.epochs, cfg.train.iters_per_epoch, cfg.optim.warmup_epochs) == (400, 1605, 40)  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("students=[pixio_vith16,pixio_vith16]", r"^students: duplicate student pixio_vith16"),
        ("students=[pixio_vith99]", r"^students\[0\]: unknown encoder 'pixio_vith99'"),
        ("students=[]", r"^students: is empty"),
        ("teacher.name=pixio_vit7b16", r"^teacher.name: unknown encoder"),
        ("loss.cls=l2", r"^loss.cls: must be one of cosine, l1, mse, none; got 'l2'"),
        ("loss.patch=none", r"^loss.patch: must be one of cosine, l1, mse; got 'none'"),
        ("loss.fuse=max", r"^loss.fuse: must be one of avg, sum"),
        ("mask_ratio=0.9", r"^mask_ratio: 0.9 leaves no patch group visible"),
        ("img_size=72", r"^img_size: 72 is not divisible by the patch size"),
        (
            "++student.overrides.pixio_vitb16={depth:2}",
            r"^student.overrides.pixio_vitb16: 'pixio_vitb16' is not one of the students",
        ),  # fmt: skip
        (
            "++student.overrides.pixio_vitt16={width:2}",
            r"^student.overrides.pixio_vitt16: unknown key",
        ),  # fmt: skip
        (
            "++student.overrides.pixio_vitt16={embed_dim:10,num_heads:4}",
            r"^student.overrides.pixio_vitt16: embed_dim 10 is not divisible by num_heads 4",
        ),  # fmt: skip
        ("teacher.num_heads=5", r"^teacher: embed_dim 32 is not divisible by num_heads 5"),
        ("student.drop_path=1.0", r"^student.drop_path: must be in \[0, 1\)"),
        ("train.iters_per_epoch=null", r"^train.iters_per_epoch: is required"),
    ],
)
def test_mistakes_name_the_key(distill_config, override, message):
    with pytest.raises(ConfigError, match=message):
        validate_distill(distill_config(override))


def test_a_missing_teacher_checkpoint_is_refused(distill_config, tmp_path):
    cfg = distill_config(f"teacher.checkpoint={tmp_path / 'gone.pth'}", f"data.root={tmp_path}")
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint: .*gone.pth does not exist"):
        validate_distill(cfg)
    validate_distill(cfg, teacher_may_be_missing=True)  # the demo is about to make it


def test_no_masking_accepts_any_patch_multiple(distill_config, tmp_path):
    cfg = distill_config("mask_ratio=0.0", "img_size=48", "mask_grid=4", f"data.root={tmp_path}")
    validate_distill(cfg)
    with pytest.raises(ConfigError, match=r"^img_size: 48 is not divisible by 16 \* mask_grid"):
        validate_distill(distill_config("mask_ratio=0.5", "img_size=48", "mask_grid=4"))


def test_resume_cannot_change_students_or_their_sizes(distill_config):
    keys = shape_keys(distill_config())
    assert {"students", "teacher.embed_dim", "student.overrides.pixio_vitt16.depth"} <= set(keys)


def test_demo_teacher_is_made_by_the_pretraining_demo_when_missing(
    distill_config, tmp_path, monkeypatch
):
    target = tmp_path / "demo" / "encoder.safetensors"
    cfg = distill_config(f"teacher.checkpoint={target}", "teacher.build_demo=true")
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        target.parent.mkdir(parents=True)
        target.write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    ensure_demo_teacher(cfg)
    ensure_demo_teacher(cfg)  # there now: nothing runs
    assert seen == [[sys.executable, "-m", "pretraining.train", "experiment=demo", f"output_dir={target.parent}"]]  # fmt: skip


def test_cli_prints_one_line_and_exits_2(tmp_path, teacher_path):
    cmd = [sys.executable, "-m", "distillation.train", f"teacher.checkpoint={teacher_path}",
           "loss.fuse=max", "data.root=/x", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("config error: loss.fuse: must be")
    assert not list((tmp_path / "out").glob("*"))  # nothing written (Hydra may make the folder)


def test_unknown_plus_keys_are_refused_and_dict_fields_still_take_new_keys(distill_config, capsys):
    cfg = distill_config()  # adds the students' sizes to student.overrides with `++`
    check_known_keys(cfg)
    assert cfg.student.overrides.pixio_vits16.depth == 2
    assert refusal(distill_config("+train.epoch=1"), validate_distill, capsys) == UNKNOWN_EPOCH
    line = refusal(distill_config("+loss.fuze=sum"), validate_distill, capsys)
    assert line.startswith("config error: loss.fuze: unknown key") and line.endswith("did you mean loss.fuse?\n")  # fmt: skip
