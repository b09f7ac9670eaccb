"""The real entry point in a subprocess on shards the test writes: two students distilled from
a tiny teacher, per-student metrics, pictures, checkpoints and exported encoders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import MODULES, STUDENT_SIZES, overrides_for

import pixio
from pixio.runtime import checkpointing

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_cli_distils_two_students_and_exports_them(teacher_path, web_shards, tmp_path):
    out = tmp_path / "run"
    args = [*overrides_for(teacher_path, out), f"data.root={web_shards}", "data.kind=web",
            "data.shuffle_buffer=16", "train.vis_every=4"]  # fmt: skip
    cmd = [sys.executable, "-m", "distillation.train", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for name in MODULES:
        assert {f"loss/{name}", f"loss_cls/{name}", f"loss_patch/{name}", f"lr/{name}"} <= set(records[-1])  # fmt: skip
        assert (out / "vis" / f"pca_{name}_step8.png").exists()
    ckpt = checkpointing.load_checkpoint(out / "checkpoint-last", ("model",))
    assert ckpt["iteration"] == 8 and sorted(ckpt["model"]) == sorted(MODULES)
    for name, (dim, depth, heads) in STUDENT_SIZES.items():
        sizes = dict(img_size=64, embed_dim=dim, depth=depth, num_heads=heads)
        encoder = pixio.load_encoder(name, out / f"encoder-{name}.safetensors", **sizes)
        state = ckpt["model"][f"student_{name}"]
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, state[key]), key
