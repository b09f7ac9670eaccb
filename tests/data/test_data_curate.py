"""The curation tool: histogram score, JSON layout read back by the filters, resuming, MAE scores."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_helpers import image_bytes, stream_keys, write_tar

from pixio import build_mae
from pixio.data import build_pretrain_dataset
from pixio.data.curate import (
    MAEScorer,
    ModelSpec,
    histogram_score,
    mae_keep_probability,
    main,
    output_paths,
)
from pixio.data.images import load_rgb

TINY_MAE = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
    decoder_depth=1, decoder_num_heads=2, mask_grid=2,
)  # fmt: skip


def flat_jpeg(value: int = 200) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (value, value, value)).save(buf, "JPEG")
    return buf.getvalue()


def levels_image(levels: int, mode: str = "RGB") -> Image.Image:
    """256 pixels spread equally over `levels` grey values."""
    values = (np.arange(256) % levels * (256 // levels)).astype(np.uint8).reshape(16, 16)
    return Image.fromarray(values, "L").convert(mode)


@pytest.mark.parametrize("levels, bits", [(1, 0.0), (2, 1.0), (4, 2.0), (256, 8.0)])
def test_histogram_score_is_the_mean_channel_entropy_in_bits(levels: int, bits: float) -> None:
    assert histogram_score(levels_image(levels)) == pytest.approx(bits)
    assert histogram_score(levels_image(levels, "L")) == pytest.approx(bits)


def test_mae_loss_maps_to_a_keep_probability() -> None:
    values = [-0.5, 0.0, 0.3, 1.0, 2.5, float("nan"), float("inf")]
    assert [mae_keep_probability(v) for v in values] == [0.0, 0.0, 0.3, 1.0, 1.0, 1.0, 1.0]


def make_web_root(root: Path) -> dict[str, int]:
    """Two parts; photos, flat images (score ~0) and one corrupt member. Returns planted counts."""
    write_tar(
        root / "a" / "s0.tar",
        [{"__key__": f"a{i}", "jpeg": image_bytes(w=40 + i, seed=i)} for i in range(4)]
        + [{"__key__": "flat0", "jpeg": flat_jpeg()}, {"__key__": "bad", "jpeg": b"\xff\xd8\xff"}],
    )
    write_tar(
        root / "b" / "s1.tar",
        [{"__key__": "b0", "jpg": image_bytes(h=33)}, {"__key__": "flat1", "jpeg": flat_jpeg(9)}],
    )
    return {"photos": 5, "flat": 2, "corrupt": 1}


def test_curation_json_round_trips_into_the_filters(tmp_path: Path) -> None:
    root, out = tmp_path / "web", tmp_path / "json"
    planted = make_web_root(root)
    main(["--shards", str(root), "--out", str(out)])
    stats = json.loads((out / "a" / "s0.json").read_text())
    assert sorted(stats) == ["a0.jpeg", "a1.jpeg", "a2.jpeg", "a3.jpeg", "flat0.jpeg"]
    assert stats["a2.jpeg"]["width"] == 42 and stats["a2.jpeg"]["height"] == 40
    assert json.loads((out / "b" / "s1.json").read_text())["b0.jpg"]["height"] == 33
    summary = json.loads((out / "curation_summary.json").read_text())
    assert summary["images"] == 7 and summary["problems"] == {"corrupt_image": 1}
    assert (out / "curation_summary.png").stat().st_size > 1000
    ds = build_pretrain_dataset(
        root, kind="web", input_size=16, json_root=out, hist_thresh=3.0, missing_json="skip",
        passes=1, shuffle_buffer=0, return_keys=True,
    )  # fmt: skip
    assert len(stream_keys(ds)) == planted["photos"]
    counts = ds.skip_counts()
    assert counts["hist_filter"] == planted["flat"] and counts["missing_json_entry"] == 1


def test_curation_resumes_and_overwrites(tmp_path: Path) -> None:
    root, out = tmp_path / "web", tmp_path / "json"
    make_web_root(root)
    args = ["--shards", str(root), "--out", str(out)]
    main(args)
    main(args)
    assert json.loads((out / "curation_summary.json").read_text())["shards_curated"] == 0
    (out / "b" / "s1.json").unlink()
    main(args)
    summary = json.loads((out / "curation_summary.json").read_text())
    assert summary["shards_curated"] == 1 and summary["images"] == 7
    main([*args, "--overwrite"])
    assert json.loads((out / "curation_summary.json").read_text())["shards_curated"] == 2


@pytest.mark.parametrize(
    "content",
    [b"{truncated", b'{"a0.jpeg": {"height": 1, "w\xffidth": 1}}', b'{"a0.jpeg": {"height": 40}}'],
    ids=["bad_json", "not_utf8", "missing_fields"],
)
def test_a_corrupt_existing_output_is_recurated_and_named(tmp_path: Path, caplog, content) -> None:
    root, out = tmp_path / "web", tmp_path / "json"
    make_web_root(root)
    args = ["--shards", str(root), "--out", str(out)]
    main(args)
    good = (out / "a" / "s0.json").read_text()
    (out / "a" / "s0.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="pixio.data"):
        main(args)
    summary = json.loads((out / "curation_summary.json").read_text())
    assert summary["shards_curated"] == 1 and summary["images"] == 7
    assert (out / "a" / "s0.json").read_text() == good
    lines = [r.getMessage() for r in caplog.records if "re-curating" in r.getMessage()]
    assert len(lines) == 1 and str(out / "a" / "s0.json") in lines[0]


def test_two_shards_writing_the_same_json_is_an_error(tmp_path: Path) -> None:
    shards = [tmp_path / "x" / "a" / "s.tar", tmp_path / "y" / "a" / "s.tar"]
    with pytest.raises(ValueError, match="would both write"):
        output_paths(shards, tmp_path / "json")


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    mae = build_mae("pixio_vitt16", **TINY_MAE)
    path = tmp_path / "mae.pth"
    torch.save({"model": mae.state_dict()}, path)
    return path, mae


def test_mae_scores_are_deterministic_and_batch_independent(tiny_checkpoint) -> None:
    _, mae = tiny_checkpoint
    scorer = MAEScorer(mae)
    images = [load_rgb(image_bytes(w=30 + 7 * i, h=50 - 3 * i, seed=i)) for i in range(5)]
    names = [f"{i:06d}.jpeg" for i in range(5)]
    prepared = [scorer.prepare(img) for img in images]
    assert all(x.shape == (3, 32, 32) for x in prepared)
    batched = scorer.score(prepared, names)
    single = [scorer.score([x], [n])[0] for x, n in zip(prepared, names, strict=True)]
    assert batched == pytest.approx(single, rel=1e-5)
    assert scorer.score(prepared, names) == batched
    assert not torch.equal(scorer.noise(names[0]), scorer.noise(names[1]))
    assert all(math.isfinite(v) and v > 0 for v in batched)


def test_curate_cli_scores_with_a_checkpoint_in_two_processes(tmp_path: Path, tiny_checkpoint):
    path, mae = tiny_checkpoint
    root, out = tmp_path / "web", tmp_path / "json"
    make_web_root(root)
    main([
        "--shards", str(root), "--out", str(out), "--mae-checkpoint", str(path),
        "--model", "pixio_vitt16", "--model-kwargs", json.dumps(TINY_MAE),
        "--workers", "2", "--batch-size", "2", "--device", "cpu",
    ])  # fmt: skip
    stats = json.loads((out / "a" / "s0.json").read_text())
    scorer = MAEScorer(mae)
    for name, entry in stats.items():
        data = image_bytes(w=40 + int(name[1]), seed=int(name[1])) if name[0] == "a" else None
        if data is not None:
            raw = scorer.score([scorer.prepare(load_rgb(data))], [name])[0]
            assert entry["mae_loss_raw"] == pytest.approx(raw, rel=1e-4)
        assert entry["mae_loss"] == mae_keep_probability(entry["mae_loss_raw"])
    summary = json.loads((out / "curation_summary.json").read_text())
    assert "mae_loss" in summary["quantiles"]


def test_a_checkpoint_that_does_not_match_the_model_is_refused(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint
    spec = ModelSpec(str(path), "pixio_vitt16", {**TINY_MAE, "depth": 2}, "cpu")
    with pytest.raises(KeyError, match="not a full MAE"):
        MAEScorer.load(spec)
