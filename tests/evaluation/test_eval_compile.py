"""`train.compile=true` on CPU: the depth evaluation demo finishes; the frozen encoder's blocks
compile one graph with no graph break, and validation and pictures compile nothing more."""

from __future__ import annotations

import pytest
from app_helpers import compose_eval, cpu_overrides, read_json, save_tiny_encoder, small_demo
from torch._dynamo.utils import counters

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("dynamo_counters"),
]


def test_depth_demo_compiled_with_inductor(tmp_path, caplog):
    from evaluation.depth import main

    checkpoint = save_tiny_encoder(tmp_path / "encoder.safetensors")
    root = small_demo("kitti", tmp_path / "kitti")
    out = tmp_path / "run"
    extra = {"dataset": "kitti", "train.batch_size": 4, "train.epochs": 1, "train.compile": "true",
             "train.vis_every": 1}  # fmt: skip
    with caplog.at_level("INFO", logger="pixio.compile"):
        main(compose_eval("depth", cpu_overrides(checkpoint, root, out, **extra)))
    assert "compile: encoder: 4 blocks, each compiled apart (backend inductor)" in caplog.text
    assert "compile: head has no blocks" in caplog.text
    # The frozen encoder's blocks: one no-grad graph for the training crops; the sliding
    # windows of validation (other batch sizes) and the pictures ran eagerly.
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    results = read_json(out / "results.json")
    assert [e["epoch"] for e in results["epochs"]] == [1.0]
    assert sorted(p.name for p in (out / "vis").glob("train_crop_step*.png")) == [
        "train_crop_step1.png",
        "train_crop_step2.png",
    ]
