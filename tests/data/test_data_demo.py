"""The demo builder: layout, statistics from the curation code, build marker, determinism."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image
from test_data_helpers import stream_keys

from pixio.data import build_pretrain_dataset
from pixio.data.demo import SOURCES, demo_jpeg, ensure_demo_data, source_images


def test_demo_set_layout_statistics_and_marker(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    paths = ensure_demo_data(root, samples=22, shard_size=4, workers=2)
    assert paths["built"] and paths["n_shards"] == 6 and paths["n_samples"] == 22
    tars = sorted(Path(paths["shards"]).rglob("*.tar"))
    assert [f"{t.parent.name}/{t.name}" for t in tars] == [
        "part-a/demo-000.tar", "part-a/demo-001.tar", "part-a/demo-002.tar",
        "part-b/demo-003.tar", "part-b/demo-004.tar", "part-b/demo-005.tar",
    ]  # fmt: skip
    entries = {}
    for js in Path(paths["json_root"]).rglob("*.json"):
        entries.update(json.loads(js.read_text()))
    assert len(entries) == 22
    assert all(set(e) == {"height", "width", "histogram_score"} for e in entries.values())
    assert all(144 <= min(e["height"], e["width"]) <= 288 for e in entries.values())
    ds = build_pretrain_dataset(
        paths["shards"], kind="web", input_size=32, json_root=paths["json_root"],
        hist_thresh=3.0, passes=1, return_keys=True,
    )  # fmt: skip
    kept = len(stream_keys(ds))
    assert kept + ds.skip_counts()["hist_filter"] == 22
    assert kept == sum(e["histogram_score"] > 3.0 for e in entries.values())
    again = ensure_demo_data(root, samples=22, shard_size=4, workers=2)
    assert not again["built"] and again["shards"] == paths["shards"]
    assert not (root / ".build").exists()


def test_changed_parameters_rebuild_the_set(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    ensure_demo_data(root, samples=6, shard_size=3, workers=1)
    paths = ensure_demo_data(root, samples=4, shard_size=4, workers=1)
    assert paths["built"]
    assert len(list(Path(paths["shards"]).rglob("*.tar"))) == 1
    assert json.loads((root / ".complete").read_text())["samples"] == 4


def test_demo_samples_are_deterministic_and_keep_greyscale() -> None:
    assert demo_jpeg(5) == demo_jpeg(5) != demo_jpeg(6)
    names, images, probs = source_images()
    assert len(names) == len(SOURCES) and abs(probs.sum() - 1) < 1e-9
    modes = {Image.open(io.BytesIO(demo_jpeg(i))).mode for i in range(40)}
    assert modes == {"L", "RGB"}
    assert {img.mode for img in images} == {"L", "RGB"}
