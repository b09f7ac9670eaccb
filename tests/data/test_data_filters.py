"""The web filters and the missing-statistics policy: exact counts against planted statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data_helpers import all_keys, stream_keys, web_shards, write_stats

from pixio.data import build_pretrain_dataset
from pixio.data.shards import stats_path

WEB = dict(kind="web", input_size=16, shuffle_buffer=0, return_keys=True, passes=1)


def entry(hist: float = 6.0, h: int = 400, w: int = 400, loss: float = 1.0) -> dict:
    return {"histogram_score": hist, "height": h, "width": w, "mae_loss": loss}


def plant(tmp_path: Path, make_entry, n_shards: int = 2, per_shard: int = 6):
    """Shards and statistics where member i of each shard gets `make_entry(i)`."""
    root, json_root = tmp_path / "web", tmp_path / "json"
    members = web_shards(root, n_shards, per_shard)
    for shard, names in members.items():
        write_stats(json_root, shard, {n: make_entry(i) for i, n in enumerate(names)})
    return root, json_root, members


def run(root: Path, json_root: Path, **kw) -> tuple[list[str], dict[str, int]]:
    ds = build_pretrain_dataset(root, json_root=json_root, **{**WEB, **kw})
    keys = stream_keys(ds)
    return keys, ds.skip_counts()


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def test_stats_path_uses_the_parent_directory_name() -> None:
    assert stats_path("/data/web/a/00042.tar", "/stats") == Path("/stats/a/00042.json")


def test_hist_filter_keeps_scores_strictly_above_the_threshold(tmp_path: Path) -> None:
    scores = [1.0, 4.5, 4.51, 7.0, 3.0, 8.0]  # 4.5 itself is dropped (strict >)
    root, json_root, _ = plant(tmp_path, lambda i: entry(hist=scores[i]))
    keys, counts = run(root, json_root, hist_thresh=4.5)
    assert len(keys) == 2 * 3
    assert nonzero(counts) == {"hist_filter": 2 * 3}


def test_res_filter_needs_both_sides_at_least_the_threshold(tmp_path: Path) -> None:
    sides = [(320, 320), (319, 1000), (1000, 319), (320, 321), (100, 100), (500, 600)]
    root, json_root, _ = plant(tmp_path, lambda i: entry(h=sides[i][0], w=sides[i][1]))
    keys, counts = run(root, json_root, imgres_thresh=320)
    assert len(keys) == 2 * 3
    assert nonzero(counts) == {"res_filter": 2 * 3}


def test_a_sample_is_counted_under_the_first_filter_that_drops_it(tmp_path: Path) -> None:
    table = [entry(hist=1.0, h=10, loss=0.0), entry(h=10, loss=0.0), entry(loss=0.0), entry()]
    root, json_root, _ = plant(tmp_path, lambda i: table[i], n_shards=1, per_shard=4)
    keys, counts = run(root, json_root, hist_thresh=4.5, imgres_thresh=320, soft_sampling=True)
    assert len(keys) == 1
    assert nonzero(counts) == {"hist_filter": 1, "res_filter": 1, "soft_sampling": 1}


def test_soft_sampling_keeps_with_probability_mae_loss(tmp_path: Path) -> None:
    losses = [0.0, 1.0, 0.5, 0.0, 1.0, 0.5]
    root, json_root, _ = plant(tmp_path, lambda i: entry(loss=losses[i]), 4, 6)
    keys, counts = run(root, json_root, soft_sampling=True)
    kept = [int(k.split("#")[1][2:6]) for k in keys]
    assert kept.count(1) == kept.count(4) == 4 and kept.count(0) == kept.count(3) == 0
    assert 0 < kept.count(2) + kept.count(5) < 8  # p = 0.5 over 8 draws
    assert counts["soft_sampling"] == 24 - len(keys)
    assert run(root, json_root, soft_sampling=True)[0] == keys  # same seed, same draws


@pytest.mark.parametrize("policy", ["unfiltered", "skip"])
def test_missing_json_file_follows_the_policy(tmp_path: Path, policy: str) -> None:
    root, json_root, members = plant(tmp_path, lambda i: entry(hist=1.0))
    stats_path(next(iter(members)), json_root).unlink()
    keys, counts = run(root, json_root, hist_thresh=4.5, missing_json=policy)
    assert len(keys) == (6 if policy == "unfiltered" else 0)
    assert nonzero(counts) == {"missing_json": 1, "hist_filter": 6}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"], ids=["garbage", "not_object"])
@pytest.mark.parametrize("policy", ["unfiltered", "skip"])
def test_bad_json_file_is_counted_then_treated_as_missing(
    tmp_path: Path, content: str, policy: str
) -> None:
    root, json_root, members = plant(tmp_path, lambda i: entry(hist=1.0))
    stats_path(next(iter(members)), json_root).write_text(content)
    keys, counts = run(root, json_root, hist_thresh=4.5, missing_json=policy)
    assert len(keys) == (6 if policy == "unfiltered" else 0)
    assert nonzero(counts) == {"bad_json": 1, "hist_filter": 6}


@pytest.mark.parametrize("policy", ["unfiltered", "skip"])
def test_missing_entries_follow_the_policy(tmp_path: Path, policy: str) -> None:
    root, json_root, members = plant(tmp_path, lambda i: entry(hist=1.0 if i < 3 else 6.0))
    shard, names = next(iter(members.items()))
    write_stats(json_root, shard, {n: entry(hist=6.0) for n in names[:2]})  # 4 entries missing
    keys, counts = run(root, json_root, hist_thresh=4.5, missing_json=policy)
    assert len(keys) == 2 + 3 + (4 if policy == "unfiltered" else 0)
    assert nonzero(counts) == {"missing_json_entry": 4, "hist_filter": 3}


@pytest.mark.parametrize("policy", ["unfiltered", "skip"])
def test_entries_without_a_needed_value_follow_the_policy(tmp_path: Path, policy: str) -> None:
    broken = [{"height": 400, "width": 400}, entry(hist=float("nan")), entry() | {"mae_loss": "x"}]
    root, json_root, _ = plant(tmp_path, lambda i: broken[i] if i < 3 else entry(), 1, 6)
    keys, counts = run(root, json_root, hist_thresh=4.5, soft_sampling=True, missing_json=policy)
    assert len(keys) == 3 + (3 if policy == "unfiltered" else 0)
    assert nonzero(counts) == {"missing_field": 3}


def test_only_the_fields_of_active_filters_are_needed(tmp_path: Path) -> None:
    root, json_root, _ = plant(tmp_path, lambda i: {"histogram_score": 6.0}, 1, 4)
    keys, counts = run(root, json_root, hist_thresh=4.5)
    assert len(keys) == 4 and not nonzero(counts)


def test_entries_match_by_member_base_name_or_bare_key_any_case(tmp_path: Path) -> None:
    root, json_root = tmp_path / "web", tmp_path / "json"
    members = web_shards(root, 1, 4)
    shard, names = next(iter(members.items()))
    keys = [n.split(".")[0] for n in names]
    listed = {names[0]: entry(), keys[1]: entry(), keys[2] + ".JPEG": entry(), "x.jpeg": entry()}
    write_stats(json_root, shard, listed)
    kept, counts = run(root, json_root, hist_thresh=4.5, missing_json="skip")
    assert len(kept) == 3 and nonzero(counts) == {"missing_json_entry": 1}


def test_statistics_are_not_read_without_a_filter(tmp_path: Path) -> None:
    root = tmp_path / "web"
    members = web_shards(root, 2, 3)
    keys, counts = run(root, tmp_path / "no_json_here")
    assert sorted(keys) == all_keys(members) and not nonzero(counts)


def test_statistics_that_are_not_utf8_are_bad_json(tmp_path: Path) -> None:
    root, json_root, members = plant(tmp_path, lambda i: entry(hist=1.0))
    stats_path(next(iter(members)), json_root).write_bytes(b'{"\xff\xfe": 1}')
    keys, counts = run(root, json_root, hist_thresh=4.5)
    assert len(keys) == 6 and nonzero(counts) == {"bad_json": 1, "hist_filter": 6}
