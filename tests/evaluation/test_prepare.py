"""`python -m evaluation.prepare`: lists written from the layouts or converted from BTS-style
lists, counts printed beside the reference's sizes, user files never touched, clear errors."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.datasets import read_split_list, scan_layout
from evaluation.datasets.splits import LIST_HEADER
from evaluation.prepare import main


def rows(out: str) -> dict[tuple[str, str], tuple[int, int]]:
    """{(dataset, split): (found, expected)} of the printed table."""
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2].isdigit():
            table[parts[0], parts[1]] = int(parts[2]), int(parts[3])
    return table


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "splits" not in p.parts}


def test_prepare_writes_the_scanned_lists_and_prints_counts(eval_demo_copy, capsys):
    root = eval_demo_copy("ade20k")
    before = snapshot(root)
    assert main(["ade20k", str(root), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["dataset", "split", "found", "expected"]
    assert rows(out) == {("ade20k", "train"): (8, 20210), ("ade20k", "val"): (3, 2000)}
    for split in ("train", "val"):
        listed = root / "splits" / f"{split}.txt"
        lines = listed.read_text().splitlines()
        assert lines[0] == LIST_HEADER and not lines[1].startswith("/")  # relative to the root
        assert read_split_list(listed, root) == scan_layout("ade20k", root, split)
    assert main(["ade20k", str(root)]) == 0  # a rerun replaces its own lists
    assert snapshot(root) == before  # the data files are untouched


def test_prepare_converts_bts_style_kitti_lists(eval_demo_copy, tmp_path, capsys):
    # BTS's Eigen lists: frames relative to the raw folder, ground truth relative to another,
    # a focal length column, and "None" where a frame has no ground truth.
    root = eval_demo_copy("kitti")
    user_list = (root / "splits" / "val.txt").read_text()
    pairs = read_split_list(root / "splits" / "val.txt", root)
    bts = [
        f"{i.relative_to(root / 'images')} {t.relative_to(root / 'annotations')} 721.5377"
        for i, t in pairs
    ]
    bts.insert(1, "2011_09_26/x/image_02/data/0000000099.png None 721.5377")
    (tmp_path / "eigen_test.txt").write_text("\n".join(bts) + "\n")
    args = ["kitti", str(root), "--val-list", str(tmp_path / "eigen_test.txt")]
    args += ["--image-dir", "images", "--target-dir", "annotations"]
    assert main([*args, "--out", str(tmp_path / "lists")]) == 0
    out = capsys.readouterr().out
    assert rows(out)["kitti", "val"] == (3, 652) and "dropped 1 lines" in out
    assert read_split_list(tmp_path / "lists/val.txt", root) == pairs
    assert main(args) == 0 and "kept" in capsys.readouterr().out  # the user's list stays
    assert (root / "splits" / "val.txt").read_text() == user_list
    assert main([*args, "--force"]) == 0
    assert (root / "splits" / "val.txt").read_text().startswith(LIST_HEADER)
    (tmp_path / "eigen_test.txt").write_text("\n".join([*bts, "lonely.png"]) + "\n")
    assert main(args) == 1 and f"{tmp_path / 'eigen_test.txt'}:5" in capsys.readouterr().err


def test_prepare_names_voc_train_size_by_list(eval_demo_copy, capsys):
    for sbd_aug, expected in ((False, 1464), (True, 10582)):
        root = eval_demo_copy("pascal", sbd_aug=sbd_aug)
        assert main(["pascal", str(root)]) == 0
        found = 10 if sbd_aug else 8
        assert rows(capsys.readouterr().out)["pascal", "train"] == (found, expected)
        root.rename(root.with_name(f"done_{sbd_aug}"))  # the next copy goes to the same path


def test_prepare_reports_errors(eval_demo_copy, tmp_path, capsys):
    assert main(["loveda", str(tmp_path / "absent")]) == 1
    assert str(tmp_path / "absent") in capsys.readouterr().err
    root = eval_demo_copy("loveda")
    assert main(["loveda", str(root), "--val-list", str(tmp_path / "none.txt")]) == 1
    assert str(tmp_path / "none.txt") in capsys.readouterr().err
    image = scan_layout("loveda", root, "val")[2][0]
    image.write_bytes(b"garbage")
    assert main(["loveda", str(root), "--verify"]) == 1
    assert f"unreadable: cannot read image {image}" in capsys.readouterr().out


def test_prepare_runs_as_a_module(tmp_path, monkeypatch, capsys):
    # In this process (runpy), as `python -m evaluation.prepare` runs it, without a new interpreter.
    monkeypatch.setattr(sys, "argv", ["prepare", "nyuv2", str(tmp_path / "missing")])
    monkeypatch.delitem(sys.modules, "evaluation.prepare", raising=False)  # runpy warns otherwise
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("evaluation.prepare", run_name="__main__")
    assert exit_info.value.code == 1
    assert f"dataset root not found: {tmp_path / 'missing'}" in capsys.readouterr().err


def test_verify_prints_the_label_values_of_each_split_and_the_formats_they_fit(
    eval_demo_copy, capsys
):
    root = eval_demo_copy("ade20k")
    assert main(["ade20k", str(root), "--verify"]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val"):  # the demo's raw masks: 0 = other, ids 1, 5, 12, 77, 150
        values = set()
        for _, target in scan_layout("ade20k", root, split):
            values |= set(np.unique(np.asarray(Image.open(target))).tolist())
        assert values == {0, 1, 5, 12, 77, 150}
        assert f"{split}: label values 0-1, 5, 12, 77, 150 fit label_format=raw\n" in out
    for _, target in scan_layout("ade20k", root, "val"):  # no 150 any more: fits both formats
        Image.fromarray(np.minimum(np.asarray(Image.open(target)), 149)).save(target)
    assert main(["ade20k", str(root), "--verify", "--label-format", "reduced"]) == 1  # train: 150
    out = capsys.readouterr().out
    assert "\nval: label values 0-1, 5, 12, 77, 149 fit label_format=raw and reduced\n" in out
    assert "\nwarning: ade20k val split: no 255 in any of its 3 masks, but a reduced" in out


def test_verify_names_labels_that_fit_no_format(eval_demo_copy, capsys):
    root = eval_demo_copy("loveda")
    target = scan_layout("loveda", root, "val")[0][1]
    mask = np.asarray(Image.open(target)).copy()
    mask[0, 0] = 200
    Image.fromarray(mask).save(target)
    assert main(["loveda", str(root), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"unreadable: {target}: raw label 200 > 7" in out
    assert (
        "val: label values 0-7, 200 fit no label_format (raw: 0..7, reduced: 0..6 and 255)" in out
    )


def test_verify_finds_depth_in_metres_and_lists_repeat_pairs(eval_demo_copy, tmp_path, capsys):
    root = eval_demo_copy("kitti")
    target = read_split_list(root / "splits" / "val.txt", root)[1][1]
    metres = np.asarray(Image.open(target)) // 256  # what a png written in metres holds
    Image.fromarray(metres.astype(np.uint16)).save(target)
    assert main(["kitti", str(root), "--verify"]) == 1
    assert f"unreadable: {target}: its largest value is {metres.max()}, so every depth would be under" in capsys.readouterr().out  # fmt: skip
    listed = (root / "splits" / "val.txt").read_text().splitlines()
    (tmp_path / "val.txt").write_text("\n".join([*listed, listed[2]]) + "\n")
    assert main(["kitti", str(root), "--val-list", str(tmp_path / "val.txt")]) == 1
    line = f"error: {tmp_path / 'val.txt'}:{len(listed) + 1}: {listed[2]} is listed twice (first on line 3)"  # fmt: skip
    assert capsys.readouterr().err == line + "\n"
