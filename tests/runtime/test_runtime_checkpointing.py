"""Atomic checkpoints, retention, resume look-up, weights_only loading, RNG state."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pixio.runtime import checkpointing as ckpt
from pixio.runtime import optim

ROOT = Path(__file__).resolve().parents[2]


def small_state(step: int) -> dict:
    """A realistic full state: model, stepped AdamW, scaler, nested config, RNG."""
    torch.manual_seed(step)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = optim.build_optimizer(model, 1e-3, 0.05)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "iteration": step,
        "config": {"train": {"epochs": 2, "betas": [0.9, 0.95], "keep_every": None}, "name": "x"},
        "rng": ckpt.capture_rng_state(),
    }


def test_full_state_round_trips_with_weights_only(tmp_path: Path) -> None:
    state = small_state(7)
    path = ckpt.save_checkpoint(state, tmp_path, 7)
    assert path == tmp_path / "checkpoint-00000007.pth"
    loaded = ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert loaded["iteration"] == 7 and loaded["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for i, s in state["optimizer"]["state"].items():
        assert torch.equal(loaded["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
    # The loaded optimiser state is usable as is.
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optim.build_optimizer(model, 1e-3, 0.05).load_state_dict(loaded["optimizer"])


def test_last_is_same_content_as_numbered(tmp_path: Path) -> None:
    ckpt.save_checkpoint({"step": 3}, tmp_path, 3)
    last, numbered = tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-00000003.pth"
    assert last.read_bytes() == numbered.read_bytes()
    assert os.path.samefile(last, numbered)  # a hard link: the second name costs no extra I/O
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([last.name, numbered.name])


def test_retention_keep_last_and_keep_every(tmp_path: Path) -> None:
    for step in range(1, 11):
        ckpt.save_checkpoint({"step": step}, tmp_path, step, keep_last=2, keep_every=4)
    steps = [s for s, _ in ckpt.numbered_checkpoints(tmp_path)]
    assert steps == [4, 8, 9, 10]
    assert ckpt.load_checkpoint(ckpt.find_latest(tmp_path))["step"] == 10


def test_retention_keep_last_zero_keeps_last_file(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ckpt.save_checkpoint({"step": step}, tmp_path, step, keep_last=0)
    assert ckpt.numbered_checkpoints(tmp_path) == []
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")["step"] == 3


def test_crash_inside_torch_save_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1)

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2}, tmp_path, 2)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-00000001.pth",
        "checkpoint-last.pth",
    ]


# Child process: saves step 1 cleanly, then SIGKILLs itself at a chosen point of saving step 2.
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from pixio.runtime import checkpointing as ckpt
    out, point = sys.argv[1], sys.argv[2]
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(1000)}, out, 1)
    real_save, real_replace, calls = torch.save, os.replace, []
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if point == "during_write":
            f.seek(f.tell() // 2); f.truncate(); f.flush(); die()
    def replace(src, dst):
        calls.append(dst)
        if point == "before_swap" and len(calls) == 1:
            die()
        real_replace(src, dst)
        if point == "after_swap" and len(calls) == 1:
            die()
    torch.save, os.replace = save, replace
    ckpt.save_checkpoint({"step": 2, "w": torch.ones(1000)}, out, 2)
    """
)


@pytest.mark.parametrize(
    ("point", "expected_last"), [("during_write", 1), ("before_swap", 1), ("after_swap", 2)]
)
def test_sigkill_during_save_leaves_loadable_last(
    tmp_path: Path, point: str, expected_last: int
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), point], env=env)
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".checkpoint-*.tmp-*"))  # the kill left a temporary behind
    latest = ckpt.find_latest(tmp_path)
    assert latest == tmp_path / "checkpoint-last.pth"
    assert ckpt.load_checkpoint(latest)["step"] == expected_last
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-00000001.pth")["step"] == 1
    ckpt.save_checkpoint({"step": 3}, tmp_path, 3)  # the next save removes the leftovers
    assert not list(tmp_path.glob(".checkpoint-*.tmp-*"))
    assert ckpt.load_checkpoint(ckpt.find_latest(tmp_path))["step"] == 3


def test_find_latest_falls_back_to_newest_complete_numbered(tmp_path: Path) -> None:
    assert ckpt.find_latest(tmp_path / "missing") is None
    assert ckpt.find_latest(tmp_path) is None
    for step in (1, 2):
        ckpt.save_checkpoint({"step": step}, tmp_path, step)
    (tmp_path / "checkpoint-last.pth").unlink()
    (tmp_path / "checkpoint-last.pth").write_bytes(b"garbage")
    (tmp_path / "checkpoint-00000003.pth").write_bytes(b"PK\x03\x04truncated")
    assert ckpt.find_latest(tmp_path) == tmp_path / "checkpoint-00000002.pth"


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsCode(marker)}, path)
    with pytest.raises(ckpt.CheckpointError, match="evil.pth"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    # The payload is live: a plain unpickling would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_unreadable_file_error_names_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="broken.pth"):
        ckpt.load_checkpoint(path)


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(),
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trip_through_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()  # and one in numpy's
    ckpt.save_checkpoint({"rng": ckpt.capture_rng_state()}, tmp_path, 0)
    expected = _draw()
    assert _draw() != expected  # the streams moved on
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "checkpoint-last.pth")["rng"])
    assert _draw() == expected


def test_copy_fallback_without_hard_links(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    ckpt.save_checkpoint({"step": 5}, tmp_path, 5)
    last, numbered = tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-00000005.pth"
    assert not os.path.samefile(last, numbered)
    assert ckpt.load_checkpoint(last)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([last.name, numbered.name])
