"""`prepare --verify` compares each split's count with the published split size
(docs/reproduction.md, Datasets): equal, or one warning naming both counts; never an error."""

from __future__ import annotations

import dataclasses

from evaluation import prepare
from evaluation.datasets.info import DATASETS

PUBLISHED = {  # train / val pairs of the published splits, as docs/reproduction.md lists them
    "nyuv2": (24231, 654), "kitti": (23158, 652), "ade20k": (20210, 2000),
    "pascal": (10582, 1449), "loveda": (2522, 1669),
}  # fmt: skip


def test_the_published_sizes_are_the_ones_documented():
    assert {name: info.expected_sizes for name, info in DATASETS.items()} == PUBLISHED


def test_verify_warns_when_a_count_differs(eval_demo_copy, capsys):
    root = eval_demo_copy("ade20k")  # 8 / 3 pairs
    assert prepare.main(["ade20k", str(root), "--verify"]) == 0  # a subset is not an error
    out = capsys.readouterr().out
    why = "a subset, missing files or another list"
    assert f"\nwarning: ade20k train: 8 pairs, the published split has 20,210: {why}\n" in out
    assert f"\nwarning: ade20k val: 3 pairs, the published split has 2,000: {why}\n" in out
    assert prepare.main(["ade20k", str(root)]) == 0  # without --verify: the table only
    assert "pairs, the published split" not in capsys.readouterr().out


def test_verify_confirms_a_complete_split_and_names_the_voc_list(eval_demo_copy, monkeypatch, capsys):  # fmt: skip
    # This copy stands for a complete release: its sizes are the published ones.
    full = dataclasses.replace(DATASETS["loveda"], expected_sizes=(8, 3))
    monkeypatch.setattr(prepare, "get_info", lambda name: full)
    assert prepare.main(["loveda", str(eval_demo_copy("loveda")), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "\ntrain: 8 pairs, as published\n" in out and "\nval: 3 pairs, as published\n" in out
    assert "warning" not in out
    monkeypatch.undo()
    assert prepare.main(["pascal", str(eval_demo_copy("pascal")), "--verify"]) == 0  # no SBD
    out = capsys.readouterr().out
    assert "warning: pascal train: 8 pairs, the published split has 10,582: a subset, missing files or another list (10,582 needs SBD's SegmentationClassAug and train_aug.txt)\n" in out  # fmt: skip
