"""The stream: construction errors, shard plans, reader splitting, determinism, endless mode."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_data_helpers import (
    all_keys,
    image_bytes,
    stream_items,
    stream_keys,
    web_shards,
    write_stats,
    write_tar,
)
from torch.utils.data import DataLoader

import pixio.data.stream as stream
from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.data import build_pretrain_dataset

WEB = dict(kind="web", input_size=16, shuffle_buffer=0, return_keys=True)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_match"])
def test_no_shards_is_a_clear_error_naming_the_path(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_match":  # a web-style tar is not an imagenet *train*.tar
        write_tar(root / "val-0.tar", [{"__key__": "0", "jpg": image_bytes()}])
    with pytest.raises(FileNotFoundError, match=str(root)) as err:
        build_pretrain_dataset(root, kind="imagenet")
    if layout == "no_match":
        assert "*train*.tar" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hist_thresh=4.5), "json_root"),
        (dict(soft_sampling=True), "json_root"),
        (dict(missing_json="drop"), "missing_json"),
        (dict(kind="laion"), "kind"),
        (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
        (dict(passes=0), "passes"),
    ],
)
def test_invalid_settings_are_value_errors(shards3, kwargs: dict, match: str) -> None:
    root, _ = shards3
    with pytest.raises(ValueError, match=match):
        build_pretrain_dataset(root, **{**WEB, **kwargs})


def test_images_are_uint8_crops_normalised_on_the_device(tmp_path: Path) -> None:
    from PIL import Image
    from test_data_helpers import png_bytes

    from pixio.runtime.prefetch import normalize_images

    flat = png_bytes(Image.new("RGB", (40, 30), (200, 100, 50)))
    write_tar(tmp_path / "a" / "s.tar", [{"__key__": "0", "jpeg": flat}])
    (image,) = list(build_pretrain_dataset(tmp_path, kind="web", input_size=24, passes=1))
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and image.is_contiguous()
    assert image.view(3, -1).unique(dim=1).tolist() == [[200], [100], [50]]
    expected = [
        (v / 255 - m) / s
        for v, m, s in zip((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    normalised = normalize_images(image[None])[0]
    assert torch.allclose(normalised.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_one_web_pass_reads_every_sample_once(shards3) -> None:
    root, members = shards3
    keys = stream_keys(build_pretrain_dataset(root, passes=1, **WEB))
    assert sorted(keys) == all_keys(members)
    twice = stream_keys(build_pretrain_dataset(root, passes=2, **WEB))
    assert Counter(twice) == Counter({k: 2 for k in all_keys(members)})


def test_web_finds_nested_tars_and_jpg_members(tmp_path: Path) -> None:
    web_shards(tmp_path / "x", 1, 2, part="deep/er")
    web_shards(tmp_path, 1, 3, part="b", ext="jpg")
    keys = stream_keys(build_pretrain_dataset(tmp_path, passes=1, **WEB))
    assert len(keys) == 5


def test_imagenet_reads_train_tars_with_resampling(tmp_path: Path) -> None:
    for name in ("imagenet-train-0", "imagenet-train-1", "imagenet-val-0"):
        samples = [
            {"__key__": f"{name}-{i}", "jpg": image_bytes(seed=i), "cls": i} for i in range(3)
        ]
        write_tar(tmp_path / f"{name}.tar", samples)
    ds = build_pretrain_dataset(tmp_path, **{**WEB, "kind": "imagenet"})
    keys = [key for _, key in itertools.islice(ds, 60)]  # endless: 60 = 10 passes of 6
    shards = Counter(key.split("#")[0].rsplit("/", 1)[-1] for key in keys)
    assert set(shards) == {"imagenet-train-0.tar", "imagenet-train-1.tar"}
    assert len(keys) == 60


def test_imagenet_readers_share_each_pass_and_draw_from_all_shards(tmp_path: Path) -> None:
    for s in range(4):
        write_tar(tmp_path / f"train-{s}.tar", [{"__key__": f"{s}", "jpg": image_bytes()}])
    seen = []
    for rank in range(2):
        ds = build_pretrain_dataset(
            tmp_path, rank=rank, world_size=2, **{**WEB, "kind": "imagenet"}
        )
        seen.append([k.split("#")[0][-11:] for _, k in itertools.islice(ds, 20)])
    # Each pass of the shared shard sequence is split between the two readers...
    for p in range(10):
        assert sorted(seen[0][2 * p : 2 * p + 2] + seen[1][2 * p : 2 * p + 2]) == [
            f"train-{s}.tar" for s in range(4)
        ]
    # ...and, unlike fixed slices shards[index::total], every reader meets every shard.
    assert set(seen[0]) == set(seen[1]) == {f"train-{s}.tar" for s in range(4)}


@pytest.mark.parametrize("n_shards", [6, 3], ids=["more_shards", "fewer_shards"])
def test_readers_over_two_ranks_and_two_workers_are_disjoint(tmp_path: Path, n_shards: int) -> None:
    members = web_shards(tmp_path, n_shards, 4)
    per_reader = []
    for rank in range(2):
        ds = build_pretrain_dataset(tmp_path, passes=1, rank=rank, world_size=2, **WEB)
        keys = stream_keys(ds, workers=2)
        per_reader.append(keys)
    union = [k for keys in per_reader for k in keys]
    assert sorted(union) == all_keys(members)  # every sample once: disjoint and complete
    assert all(per_reader)


def test_same_seed_same_order_and_crops(shards3) -> None:
    root, _ = shards3
    kw = dict(WEB, shuffle_buffer=5, passes=1)
    a = stream_items(build_pretrain_dataset(root, seed=3, **kw), workers=2)
    b = stream_items(build_pretrain_dataset(root, seed=3, **kw), workers=2)
    c = stream_items(build_pretrain_dataset(root, seed=4, **kw), workers=2)
    assert [k for _, k in a] == [k for _, k in b]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))
    assert [k for _, k in a] != [k for _, k in c]


def test_set_epoch_selects_a_new_order_of_the_same_samples(shards3) -> None:
    root, members = shards3
    ds = build_pretrain_dataset(root, passes=1, **dict(WEB, shuffle_buffer=5))
    first = stream_keys(ds)
    ds.set_epoch(1)
    second = stream_keys(ds)
    ds.set_epoch(0)
    assert stream_keys(ds) == first
    assert second != first and sorted(second) == sorted(first) == all_keys(members)


def test_persistent_workers_follow_set_epoch(shards3) -> None:
    root, _ = shards3
    kw = dict(WEB, shuffle_buffer=5, passes=1)
    ds = build_pretrain_dataset(root, **kw)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epoch0 = [k for _, k in loader]
    ds.set_epoch(1)
    epoch1 = [k for _, k in loader]
    fresh = build_pretrain_dataset(root, **kw)
    fresh.set_epoch(1)
    assert epoch1 == stream_keys(fresh, workers=2) and epoch1 != epoch0


def test_stream_is_endless_without_passes(shards3) -> None:
    root, members = shards3
    keys = [k for _, k in itertools.islice(build_pretrain_dataset(root, **WEB), 50)]
    assert len(keys) == 50 and set(keys) == set(all_keys(members))


def test_shuffle_buffer_mixes_shards(shards3) -> None:
    root, _ = shards3
    plain = stream_keys(build_pretrain_dataset(root, passes=1, **WEB))
    mixed = stream_keys(build_pretrain_dataset(root, passes=1, **dict(WEB, shuffle_buffer=12)))
    assert sorted(plain) == sorted(mixed) and plain != mixed


def test_rank_and_world_size_default_to_env(shards3, monkeypatch) -> None:
    root, _ = shards3
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = build_pretrain_dataset(root, **WEB)
    assert (ds.rank, ds.world_size) == (1, 3)
    with pytest.raises(ValueError, match="rank"):
        build_pretrain_dataset(root, rank=3, world_size=3, **WEB)


def test_a_stream_with_nothing_usable_fails_instead_of_hanging(shards3, monkeypatch) -> None:
    root, members = shards3
    for shard, names in members.items():
        write_stats(root.parent / "json", shard, {n: {"histogram_score": 1.0} for n in names})
    monkeypatch.setattr(stream, "MAX_EMPTY_PASSES", 3)
    ds = build_pretrain_dataset(
        root, json_root=root.parent / "json", hist_thresh=2.0, shard_interleave=1, **WEB
    )
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(ds))
    assert ds.skip_counts()["hist_filter"] == 3 * 12
