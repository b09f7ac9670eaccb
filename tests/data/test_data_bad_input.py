"""Bad input never stops the stream and is never lost silently: counted by reason, logged once
per problem shard, with 0 and 2 DataLoader workers."""

from __future__ import annotations

import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_helpers import image_bytes, png_bytes, stream_keys, web_shards, write_tar

from pixio.data import build_pretrain_dataset

WEB = dict(kind="web", input_size=16, shuffle_buffer=0, return_keys=True, passes=1)


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def mixed_samples() -> tuple[list[dict], int]:
    """A shard's samples: 8 usable (3 RGB + 5 other modes), 2 corrupt, 2 not images."""
    good = image_bytes(seed=1)
    deep = Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16))
    rgba = Image.new("RGBA", (48, 40), (255, 0, 0, 0))
    usable = [
        good,
        image_bytes(seed=2),
        image_bytes(seed=3),
        image_bytes(mode="L"),
        image_bytes(mode="CMYK"),
        png_bytes(rgba),
        png_bytes(deep),
        png_bytes(Image.new("P", (48, 40), 3)),
    ]
    broken = [good[: len(good) // 2], b"\x89PNG\r\n\x1a\n" + b"\x00" * 40]
    junk = [b"this is not an image"]
    samples = [
        {"__key__": f"{i:03d}", "jpeg": data} for i, data in enumerate(usable + broken + junk)
    ]
    samples.append({"__key__": "999", "txt": b"a caption without its image"})
    return samples, len(usable)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_are_counted_and_the_rest_used(tmp_path: Path, workers: int) -> None:
    samples, n_usable = mixed_samples()
    write_tar(tmp_path / "a" / "mixed.tar", samples)
    web_shards(tmp_path, 1, 3, part="b")
    ds = build_pretrain_dataset(tmp_path, **WEB)
    keys = stream_keys(ds, workers=workers)
    assert len(keys) == n_usable + 3
    assert nonzero(ds.skip_counts()) == {"corrupt_image": 2, "not_an_image": 2}


def test_one_log_line_per_shard_and_reason(tmp_path: Path, caplog) -> None:
    samples, _ = mixed_samples()
    mixed = write_tar(tmp_path / "a" / "mixed.tar", samples)
    web_shards(tmp_path, 2, 2, part="b")
    ds = build_pretrain_dataset(tmp_path, **{**WEB, "passes": 3})
    with caplog.at_level(logging.WARNING, logger="pixio.data"):
        stream_keys(ds)
    lines = [r.getMessage() for r in caplog.records if r.name == "pixio.data"]
    assert all(line.startswith(f"shard {mixed}: ") for line in lines)
    reasons = sorted(r for line in lines for r in ("corrupt_image", "not_an_image") if r in line)
    assert reasons == ["corrupt_image", "not_an_image"] and len(lines) == 2  # not once per pass
    assert nonzero(ds.skip_counts()) == {"corrupt_image": 3 * 2, "not_an_image": 3 * 2}


def test_decompression_bombs_are_corrupt_images(tmp_path: Path, monkeypatch) -> None:
    web_shards(tmp_path, 1, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 48 x 40 is over twice the limit
    ds = build_pretrain_dataset(tmp_path, **WEB)
    assert stream_keys(ds) == [] and nonzero(ds.skip_counts()) == {"corrupt_image": 3}


def member_offsets(path: Path) -> list[tuple[int, int]]:
    """(header offset, data offset) of every member."""
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


@pytest.mark.parametrize(
    "cut",
    ["inside_data", "inside_header", "at_member_boundary", "in_first_header"],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_tars_keep_the_samples_before_the_damage(
    tmp_path: Path, cut: str, workers: int
) -> None:
    members = web_shards(tmp_path, 2, 4)
    damaged = Path(sorted(members)[0])
    header, data = member_offsets(damaged)[2]
    end = {
        "inside_data": data + 100,
        "inside_header": header + 200,
        "at_member_boundary": header,
        "in_first_header": 300,
    }[cut]
    damaged.write_bytes(damaged.read_bytes()[:end])
    ds = build_pretrain_dataset(tmp_path, **WEB)
    keys = stream_keys(ds, workers=workers)
    before = 0 if cut == "in_first_header" else 2
    assert len(keys) == 4 + before
    assert nonzero(ds.skip_counts()) == {"bad_tar": 1}


@pytest.mark.parametrize("content", [b"", b"garbage " * 200], ids=["empty", "garbage"])
def test_unreadable_tars_are_counted_and_skipped(tmp_path: Path, content: bytes) -> None:
    web_shards(tmp_path, 1, 3)
    (tmp_path / "a" / "broken.tar").write_bytes(content)
    ds = build_pretrain_dataset(tmp_path, **WEB)
    assert len(stream_keys(ds)) == 3
    assert nonzero(ds.skip_counts()) == {"bad_tar": 1}


def test_counts_accumulate_over_passes_and_epochs(tmp_path: Path) -> None:
    samples, _ = mixed_samples()
    write_tar(tmp_path / "a" / "mixed.tar", samples)
    ds = build_pretrain_dataset(tmp_path, **{**WEB, "passes": 2})
    stream_keys(ds)
    ds.set_epoch(1)
    stream_keys(ds, workers=2)
    assert nonzero(ds.skip_counts()) == {"corrupt_image": 8, "not_an_image": 8}


def test_a_bad_shard_revisited_by_resampling_logs_each_reason_once(tmp_path: Path, caplog) -> None:
    good = image_bytes(seed=1)
    bad = write_tar(
        tmp_path / "imagenet-train-bad.tar",
        [{"__key__": "0", "jpg": good[:100]}, {"__key__": "1", "cls": b"3"}, {"__key__": "2", "jpg": good}],
    )  # fmt: skip
    write_tar(tmp_path / "imagenet-train-good.tar", [{"__key__": "g", "jpg": good}])
    ds = build_pretrain_dataset(tmp_path, kind="imagenet", input_size=16, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="pixio.data"):
        images = list(itertools.islice(ds, 20))  # endless: the bad shard is read 10 times
    lines = [r.getMessage() for r in caplog.records if r.name == "pixio.data"]
    assert len(images) == 20 and len(lines) == 2
    assert all(line.startswith(f"shard {bad}: ") for line in lines)
    counts = nonzero(ds.skip_counts())  # every visit still counted
    assert set(counts) == {"corrupt_image", "not_an_image"} and min(counts.values()) >= 5
