"""Shard samples without a usable `.cls` label (`pixio.monitor.shard_samples`, read by the online
k-NN monitor and the linear probe) are skipped, counted and reported: each one's reason, a
warning line with the count and the first, and in the error when a split has no label at all."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tests_helpers import write_tar

from evaluation.linear_data import build_indexes
from pixio.data.demo import demo_jpeg
from pixio.monitor import KnnMonitor, MonitorConfig, plan, shard_samples
from pixio.runtime.config import ConfigError
from pixio.runtime.distributed import DistInfo

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def labelled(key: int, label: str | None) -> dict:
    """An image sample `key`, with `label` as its `.cls` (None: no `.cls` member)."""
    return {"__key__": f"{key:06d}", "jpg": demo_jpeg(key), **({"cls": label.encode()} if label is not None else {})}  # fmt: skip


def test_shard_samples_returns_the_labelled_and_names_every_sample_left_out(tmp_path):
    tar = write_tar(tmp_path / "a.tar", [
        labelled(0, "0"), labelled(1, None), labelled(2, "2"), labelled(3, "-1"), labelled(4, "cat"),
        {"__key__": "000005", "cls": b"1"},  # a label without an image
    ])  # fmt: skip
    samples, skipped = shard_samples(tar)
    assert [s.label for s in samples] == [0, 2]
    assert skipped == [
        f"{tar}@000001: no .cls label",
        f"{tar}@000003: .cls '-1' is not a class index",
        f"{tar}@000004: .cls 'cat' is not a class index",
        f"{tar}@000005: a .cls without an image",
    ]


def monitor_cfg(root: Path):
    fields = dict(knn_root=str(root), build_demo=False, train_images=100, val_images=100, k=3, batch_size=4)  # fmt: skip
    return OmegaConf.structured(MonitorConfig(**fields))


def test_the_monitor_counts_and_logs_unlabelled_shard_samples(tmp_path, caplog):
    root = tmp_path / "shards"
    train = write_tar(root / "train" / "a.tar", [labelled(i, None if i in (1, 4) else str(i % 2)) for i in range(6)])  # fmt: skip
    write_tar(root / "val" / "a.tar", [labelled(10 + i, str(i % 2)) for i in range(3)])
    subsets = plan(monitor_cfg(root))
    assert len(subsets["train"]) == 4 and len(subsets["val"]) == 3
    assert (subsets["unlabelled"]["train"].count, subsets["unlabelled"]["val"].count) == (2, 0)
    with caplog.at_level(logging.WARNING, logger="pixio.monitor"):
        KnnMonitor(monitor_cfg(root), 32, SINGLE)
    assert f"k-NN monitor: train of {root}: 2 samples without a class label skipped (first: {train}@000001: no .cls label)" in caplog.text  # fmt: skip
    assert "k-NN monitor: val of" not in caplog.text
    write_tar(root / "val" / "a.tar", [labelled(10, None)])  # no label at all: an error
    with pytest.raises(ConfigError, match=rf"^monitor.knn_root: {root / 'val'} holds no labelled image \(1 samples without a class label skipped \(first: .*@000010: no .cls label\)\)$"):  # fmt: skip
        plan(monitor_cfg(root))


def test_the_linear_probe_counts_and_logs_unlabelled_shard_samples(tmp_path, caplog):
    root = tmp_path / "flat"  # pre-training's layout: *train*.tar and *val*.tar under the root
    train = write_tar(root / "imagenet-train-0.tar", [labelled(i, None if i == 2 else str(i % 3)) for i in range(7)])  # fmt: skip
    write_tar(root / "imagenet-val-0.tar", [labelled(20 + i, str(i % 3)) for i in range(3)])
    with caplog.at_level(logging.WARNING, logger="pixio.eval"):
        train_index, val_index, classes = build_indexes(root)
    assert (len(train_index), len(val_index), classes) == (6, 3, 3)
    assert list(train_index.label) == [0, 1, 0, 1, 2, 0]
    assert f"data.root: {root} (train shards): 1 samples without a class label skipped (first: {train}@000002: no .cls label)" in caplog.text  # fmt: skip
    assert "val shards" not in caplog.text
