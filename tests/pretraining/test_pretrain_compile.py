"""`train.compile=true` on CPU, end to end: the pre-training demo (uint8 demo shards, inductor)
finishes; each block stack compiles one graph with no graph break, and the pictures compile
nothing more."""

from __future__ import annotations

import json

import pytest
import torch
from tests_helpers import CPU_OVERRIDES, compose_pretrain
from torch._dynamo.utils import counters

from pixio.data.demo import ensure_demo_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("dynamo_counters"),
]


def _counts() -> dict[str, int]:
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_pretraining_demo_compiled_with_inductor(tmp_path, caplog):
    from pretraining.train import main

    demo = ensure_demo_data(tmp_path / "demo", samples=24, shard_size=4, workers=1)
    common = [
        "data=demo", *CPU_OVERRIDES, f"data.root={demo['shards']}", f"data.json_root={demo['json_root']}",
        "data.build_demo=false", "data.shuffle_buffer=16", "train.epochs=1", "train.vis_every=2",
    ]  # fmt: skip
    main(compose_pretrain([*common, "train.compile=false", f"output_dir={tmp_path / 'eager'}"]))
    assert _counts() == {"graphs": 0, "breaks": 0}
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="pixio.compile"):
        main(compose_pretrain([*common, "train.compile=true", f"output_dir={out}"]))
    assert "compile: mae: 3 blocks, each compiled apart (backend inductor)" in caplog.text
    # Encoder and decoder blocks: one graph each; two pictures ran eagerly.
    assert _counts() == {"graphs": 2, "breaks": 0}
    assert sorted(p.name for p in (out / "vis").iterdir()) == [
        "reconstruction_step2.png",
        "reconstruction_step4.png",
    ]
    eager, compiled = _losses(tmp_path / "eager"), _losses(out)
    assert len(compiled) == 4 and all(0 < loss < 10 for loss in compiled)
    # Same data, masks and weights (no drop path): inductor's kernels round differently only.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    assert (out / "encoder.safetensors").exists()
