"""Distillation's readers of training checkpoints: the teacher loader and
`python -m distillation.export` verify the checkpoint first (a damaged one is refused in one
line, nothing written); exports are named by step and never replace the run's final encoder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import TEACHER
from integrity_helpers import (
    assert_refusal,
    training_checkpoint,
    zero_inside_tensor,
    zero_record_header,
)

import pixio
from distillation.export import main as export_main
from distillation.model import build_student, teacher_loader
from pixio.checkpoint import save_state_dict
from pixio.runtime.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

REPO = Path(__file__).resolve().parents[2]
SIZES = dict(img_size=64, embed_dim=16, depth=1, num_heads=2)
STUDENTS = ("student_pixio_vitt16", "student_pixio_vits16")


def _students(seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {name: build_student("pixio_vitt16", 32, 2, **SIZES) for name in STUDENTS}


def _export(checkpoint: Path, capsys, *args: str) -> tuple[int, list[str], list[str]]:
    """`python -m distillation.export` in this process: exit status, stdout and stderr lines."""
    code = 0
    try:
        export_main([str(checkpoint), *args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def _encoder(path: Path) -> dict[str, torch.Tensor]:
    return pixio.load_encoder("pixio_vitt16", path, **SIZES).state_dict()


def _assert_student(exported: Path, module: torch.nn.Module) -> None:
    saved = _encoder(exported)
    assert saved and all(torch.equal(v, module.state_dict()[k]) for k, v in saved.items())


def test_export_names_files_by_step_and_keeps_the_final_encoder(tmp_path, capsys):
    run = tmp_path / "run"
    older, newer = _students(1), _students(2)
    training_checkpoint(run, older, step=4)
    training_checkpoint(run, newer, step=8)
    final = run / "encoder-pixio_vitt16.safetensors"  # what the run wrote at its end
    save_state_dict(newer[STUDENTS[0]].state_dict(), final)
    final_bytes = final.read_bytes()
    code, out, _ = _export(run / "checkpoint-00000004", capsys)
    assert code == 0 and final.read_bytes() == final_bytes
    step4 = run / "encoder-pixio_vitt16-step4.safetensors"
    assert out == [f"wrote {run / 'encoder-pixio_vits16-step4.safetensors'}", f"wrote {step4}"]
    _assert_student(step4, older[STUDENTS[0]])
    _assert_student(run / "encoder-pixio_vits16-step4.safetensors", older[STUDENTS[1]])
    assert "last_proj.0.weight" not in pixio.read_state_dict(step4)
    assert _export(run / "checkpoint-last", capsys)[0] == 0  # step 8, beside step 4
    _assert_student(run / "encoder-pixio_vitt16-step8.safetensors", newer[STUDENTS[0]])
    assert _export(run / "checkpoint-00000004", capsys)[0] == 0  # again: same bytes, fine
    before = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    training_checkpoint(run, _students(3), step=4)  # step 4 saved again with other weights
    code, out, err = _export(run / "checkpoint-00000004", capsys)
    assert code == 2 and out == [] and len(err) == 1
    assert err[0] == (
        f"error: {run / 'encoder-pixio_vits16-step4.safetensors'} exists and holds other weights (a checkpoint saved again at that "
        "step?): move it away or pass --out; nothing was written"
    )
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == before
    assert list(run.glob(".encoder-*")) == []  # no temporary export left behind


def test_export_help_says_how_files_are_named(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "encoder-<name>-step<N>.safetensors" in text and "never replaced" in text


def test_export_cli_refuses_a_damaged_checkpoint_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    final = training_checkpoint(run, _students(1), step=4)
    fqn = f"model.{STUDENTS[1]}.blocks.0.attn.qkv.weight"  # the second student's tensor
    zero_inside_tensor(final, fqn)
    cmd = [sys.executable, "-m", "distillation.export", str(final)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), res.stderr
    assert_refusal(lines[0], final, "__0_0.distcp")
    assert list(run.glob("*.safetensors")) == [] and list(run.glob(".encoder-*")) == []
    zero_record_header(final, f"model.{STUDENTS[0]}.pos_embed")
    code, out, err = _export(final, capsys, "--out", str(tmp_path / "elsewhere"))
    assert code == 2 and out == [] and len(err) == 1
    assert_refusal(err[0], final, "__0_0.distcp")
    assert not (tmp_path / "elsewhere").exists() or not any((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize("damage", [zero_inside_tensor, zero_record_header])
def test_teacher_loader_refuses_a_damaged_training_checkpoint(tmp_path, damage):
    torch.manual_seed(0)
    source = pixio.build_encoder("pixio_vitt16", **TEACHER)
    final = training_checkpoint(tmp_path / "pretrain", {"mae": source})
    with torch.device("meta"):
        teacher = pixio.build_encoder("pixio_vitt16", **TEACHER)
    teacher.to_empty(device="cpu")
    teacher_loader(final)(teacher)  # intact: the teacher gets the saved weights
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in teacher.state_dict().items())
    damage(final, "model.mae.patch_embed.proj.weight")
    with pytest.raises(ConfigError) as info:
        teacher_loader(final)(teacher)
    message = str(info.value)
    assert message.startswith("teacher.checkpoint: checkpoint ")
    assert_refusal(message, final, "__0_0.distcp")
    assert "check teacher.name" not in message  # the file is at fault, not the sizes
