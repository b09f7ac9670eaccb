"""Faults a user meets, through the real entry point `main(cfg)` in-process: a resume with another
model shape or other settings, a second run in the same output_dir, checkpoints that all fail."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from tests_helpers import CPU_OVERRIDES, compose_pretrain

from pixio.runtime.job import OutputDirLock
from pretraining.train import main

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(root / "imagenet-train-000000.tar")) as tar:
        for i in range(24):
            pixels = rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG")
            tar.write({"__key__": f"{i:05d}", "jpg": buf.getvalue()})
    return root


@pytest.fixture(autouse=True)
def _drop_our_log_handlers():
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pixio", False)]:
        root.removeHandler(handler)
        handler.close()


def _cfg(shards, out, *extra):
    return compose_pretrain(
        [*CPU_OVERRIDES, f"data.root={shards}", "data.shuffle_buffer=8", f"output_dir={out}",
         "train.epochs=1", "train.iters_per_epoch=2", "train.save_every_iters=2", *extra]
    )  # fmt: skip


def _listing(out):
    """Every file's modification time, except the lock and the log (which a refused run may touch)."""
    return {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.name not in (".pixio.lock", "train.log")
    }


def test_resume_with_another_shape_is_refused_in_one_line(shards, tmp_path, capsys):
    out = tmp_path / "run"
    main(_cfg(shards, out))
    before = _listing(out)
    with pytest.raises(SystemExit) as stop:
        main(_cfg(shards, out, "model.depth=3", "train.epochs=2"))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("config error: model.depth: ") and "was trained with 2" in err[-1]
    assert "this run asks for 3" in err[-1]
    assert _listing(out) == before
    assert "depth: 2" in (out / "config.yaml").read_text()


def test_resume_with_changed_settings_logs_them_and_keeps_the_original_config(
    shards, tmp_path, caplog
):
    out = tmp_path / "run"
    main(_cfg(shards, out))
    original = (out / "config.yaml").read_text()
    with caplog.at_level(logging.INFO, logger="pixio.config"):
        main(_cfg(shards, out, "train.epochs=2", "optim.lr=5e-4"))
    changed = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("resume changes optim.lr: 0.001 -> 0.0005" in m for m in changed)
    assert any("resume changes train.epochs: 1 -> 2" in m for m in changed)
    assert (out / "config.yaml").read_text() == original
    assert "lr: 0.0005" in (out / "config.resume-00000002.yaml").read_text()


def test_second_run_in_the_same_output_dir_is_refused(shards, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = OutputDirLock(out).acquire()
    try:
        with pytest.raises(SystemExit) as stop:
            main(_cfg(shards, out))
    finally:
        held.release()
    assert stop.value.code == 1
    assert "is in use by another run" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint-last").exists()


def _flip_a_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage inside, size unchanged
    f.write_bytes(bytes(data))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate])
def test_checkpoints_that_all_fail_stop_the_run_and_change_nothing(
    shards, tmp_path, capsys, damage
):
    out = tmp_path / "run"
    main(_cfg(shards, out, "train.save_every_iters=1", "train.keep_last=2"))
    for ckpt in out.glob("checkpoint-0*"):
        for f in ckpt.glob("*.distcp"):
            damage(f)
    before = _listing(out)
    with pytest.raises(SystemExit) as stop:
        main(_cfg(shards, out, "train.epochs=2"))
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "checkpoint" in err[-1]
    assert _listing(out) == before
