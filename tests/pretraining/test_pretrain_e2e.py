"""The real entry point, end to end, in subprocesses: `experiment=demo` on a short schedule, and
a run stopped by SIGTERM then re-run, which must end with the weights of an uninterrupted run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from tests_helpers import CPU_OVERRIDES

import pixio
from pixio.runtime import checkpointing

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# Runs the CLI in-process after arranging for a real SIGTERM to arrive during iteration `k`.
INTERRUPT = """
import os, signal, sys
from pixio.runtime.trainer import Trainer
from pretraining.train import cli

k = int(sys.argv.pop(1))
sig = getattr(signal, sys.argv.pop(1))
original = Trainer.train_iteration

def train_iteration(self, it, batch):
    if it == k:
        os.kill(os.getpid(), sig)
    return original(self, it, batch)

Trainer.train_iteration = train_iteration
cli()
"""


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A smooth random colour image with noise (something an MAE can learn), as JPEG bytes."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(0, 6, 3)
    base = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y))], -1)
    pixels = (127.5 + 100 * base + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def web_shards(tmp_path_factory) -> Path:
    """Two web-format shards (`.jpeg` members) of 20 images each, 80-120 px."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(2):
        (root / f"part-{s}").mkdir()
        with wds.TarWriter(str(root / f"part-{s}" / f"{s:05d}.tar")) as tar:
            for i in range(20):
                h, w = rng.integers(80, 121, 2)
                tar.write({"__key__": f"{s}{i:05d}", "jpeg": _jpeg(rng, int(h), int(w))})
    return root


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    return result


def _overrides(shards: Path, out: Path) -> list[str]:
    return [
        *CPU_OVERRIDES,
        f"data.root={shards}",
        "data.kind=web",
        "data.shuffle_buffer=16",
        "train.epochs=2",
        "train.iters_per_epoch=4",
        "train.save_every_iters=100",  # only the pre-emption and final checkpoints
        f"output_dir={out}",
    ]


def test_sigterm_stop_then_rerun_equals_uninterrupted_run(web_shards, tmp_path):
    full = _run(["-m", "pretraining.train", *_overrides(web_shards, tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]

    part = tmp_path / "part"
    stopped = _run(["-c", INTERRUPT, "5", "SIGTERM", *_overrides(web_shards, part)])
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "pre-empted (SIGTERM) at step 6" in stopped.stdout
    ckpt = checkpointing.load_checkpoint(part / "checkpoint-last")
    assert ckpt["iteration"] == 6 and not (part / "encoder.safetensors").exists()

    resumed = _run(["-m", "pretraining.train", *_overrides(web_shards, part)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    a = checkpointing.load_checkpoint(tmp_path / "full" / "checkpoint-last")
    b = checkpointing.load_checkpoint(part / "checkpoint-last")
    assert a["iteration"] == b["iteration"] == 8
    for key, value in a["model"]["mae"].items():
        assert torch.equal(value, b["model"]["mae"][key]), key
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step logged once across the two runs


def test_ctrl_c_saves_at_the_next_step_and_exits_cleanly(web_shards, tmp_path):
    out = tmp_path / "interrupted"
    stopped = _run(["-c", INTERRUPT, "2", "SIGINT", *_overrides(web_shards, out)])
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert "received SIGINT: will save and stop at the next step" in stopped.stderr
    assert "pre-empted (SIGINT) at step 3: checkpoint saved, stopping" in stopped.stdout
    assert checkpointing.read_meta(out / "checkpoint-last")["iteration"] == 3


def test_the_demo_builds_its_data_where_data_root_points_when_missing(monkeypatch, tmp_path):
    """The app's side of `data.build_demo` (the end-to-end run below finds data/demo built; the
    builder itself is tests/data/test_data_demo.py's)."""
    from tests_helpers import compose_pretrain

    import pixio.data.demo
    from pixio.data.loader import _data_paths

    built = []
    fake = lambda root: built.append(str(root)) or {"shards": "S", "json_root": "J"}  # noqa: E731
    monkeypatch.setattr(pixio.data.demo, "ensure_demo_data", fake)
    cfg = compose_pretrain(["experiment=demo", f"data.root={tmp_path / 'demo'}"])
    assert _data_paths(cfg.data) == ("S", "J") and built == [str(tmp_path / "demo")]
    cfg = compose_pretrain(["experiment=demo", "data.build_demo=false", "data.root=/shards"])
    assert _data_paths(cfg.data) == ("/shards", cfg.data.json_root) and len(built) == 1


def test_demo_experiment_end_to_end(tmp_path):
    # The demo's own data/demo, as `make demo` reads it: built once per checkout (under a lock)
    # and shared with the SLURM demo tests; tests/data/test_data_demo.py checks the build.
    out = tmp_path / "demo_run"
    args = [
        "-m", "pretraining.train", "experiment=demo", f"output_dir={out}",
        "train.epochs=2", "train.iters_per_epoch=3", "train.save_every_iters=3",
        "train.log_every=1", "train.vis_every=3", "data.shuffle_buffer=50",
    ]  # fmt: skip
    result = _run(args, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(out.resolve()) in result.stdout + result.stderr  # says where the outputs are
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all({"step", "epoch", "loss", "lr", "images_per_s"} <= r.keys() for r in records)
    assert all(np.isfinite(r["loss"]) for r in records)
    vis = out / "vis"
    assert (vis / "reconstruction_step3.png").exists() and (
        vis / "reconstruction_step6.png"
    ).exists()
    assert checkpointing.load_checkpoint(out / "checkpoint-last")["iteration"] == 6
    encoder = pixio.load_encoder("pixio_vitt16", out / "encoder.safetensors", depth=6, img_size=128)
    assert encoder(torch.zeros(1, 3, 128, 128))[-1]["patch_tokens_norm"].shape == (1, 64, 192)
