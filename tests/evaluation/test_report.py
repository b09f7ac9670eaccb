"""`python -m evaluation.report ROOT`: one table of the results.json files of several runs (written
here by the apps' own `write_results`), labelled best and final, beside the published numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from app_helpers import fake_run

from evaluation import report

REPO = Path(__file__).resolve().parents[2]


def run_lines(lines: list[str]) -> list[str]:
    """The per-run table's lines (header, rule, rows): it follows the side-by-side table."""
    start = next(i for i, line in enumerate(lines) if line.split()[:6] == list(report.COLUMNS[:6]))
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("best = "))
    return lines[start:end]


def comparison(lines: list[str]) -> tuple[list[str], dict[tuple[str, ...], list[str]]]:
    """The side-by-side table: its header (split on two spaces, as the columns are padded) and
    its rows by (task, dataset, head)."""
    start = lines.index(report.COMPARISON_TITLE) + 1
    end = lines.index(report.COMPARISON_NOTE)
    header = [c.strip() for c in lines[start].split("  ") if c.strip()]
    body = [line.split() for line in lines[start + 2 : end]]
    return header, {tuple(r[:3]): r[3:] for r in body}


def test_report_prints_every_run_with_best_final_and_published(tmp_path, capsys):
    fake_run(tmp_path / "nyuv2_dpt", "depth", "nyuv2", "dpt", [80.0, 93.25, 92.5])
    fake_run(tmp_path / "loveda_linear", "semseg", "loveda", "linear", [40.0, 51.5])
    knn = {"top1": {"10": 70.5, "20": 71.25}, "top5": {"10": 88.0, "20": 89.0},
           "encoder": "pixio_vith16"}  # fmt: skip
    (tmp_path / "knn").mkdir()
    (tmp_path / "knn" / "results.json").write_text(json.dumps(knn))
    # A run still going: val_results.json and config.yaml, no results.json yet.
    (tmp_path / "kitti_dpt").mkdir()
    (tmp_path / "kitti_dpt" / "config.yaml").write_text(
        "dataset:\n  name: kitti\nhead:\n  name: dpt\nencoder:\n  name: pixio_vith16\n"
    )
    partial = {"metric": "d1", "best": {"d1": 60.0, "epoch": 1.0}, "last": {"d1": 55.0}}
    (tmp_path / "kitti_dpt" / "val_results.json").write_text(json.dumps(partial))
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = run_lines(out)
    row = {line.split()[-1]: line.split() for line in lines if line.split()[-1:] != []}
    nyu = next(line for line in lines if line.startswith("depth") and "nyuv2" in line).split()
    assert nyu[:7] == [
        "depth",
        "nyuv2",
        "dpt",
        "pixio_vith16",
        "encoder.pth@abababab",
        "d1",
        "-",
    ]  # no protocol
    assert nyu[7:12] == ["93.25", "(2)", "92.50", "95.50", "80.80"]  # best (epoch), final, paper
    loveda = next(line for line in lines if "loveda" in line).split()
    assert loveda[7:12] == ["51.50", "(2)", "51.50", "53.90", "-"]
    assert "incomplete" in row and row["incomplete"][:3] == ["depth", "kitti", "dpt"]
    assert row["incomplete"][4] == "-"  # its config.yaml records no checkpoint
    assert row["incomplete"][7:10] == ["60.00", "(1)", "55.00"]
    knn_rows = [line.split() for line in lines if line.startswith("knn")]
    assert [r[2] for r in knn_rows] == ["k=10", "k=20"] and knn_rows[1][9] == "71.25"
    # Depth rows first, then segmentation, then k-NN; the cells without a run are named.
    tasks = [line.split()[0] for line in lines[2:]]
    assert tasks == ["depth", "depth", "semseg", "knn", "knn"]
    # The side-by-side table comes first: one column per checkpoint (the runs without a
    # recorded digest under the bare name), the incomplete run starred.
    header, cells = comparison(out)
    assert out.index(report.COMPARISON_TITLE) < out.index(lines[0])
    pixio = "pixio_vith16@abababab"
    assert header == ["task", "dataset", "head", "pixio_vith16", pixio, *report.PAPER_COLUMNS]
    assert list(cells) == [("depth", "kitti", "dpt"), ("depth", "nyuv2", "dpt"),
                           ("semseg", "loveda", "linear"), ("knn", "imagenet", "k=10"),
                           ("knn", "imagenet", "k=20")]  # fmt: skip
    assert cells["depth", "kitti", "dpt"] == ["60.00*", "-", "96.70", "-"]
    assert cells["depth", "nyuv2", "dpt"] == ["-", "93.25", "95.50", "80.80"]
    assert cells["knn", "imagenet", "k=20"] == ["71.25", "-", "-", "-"]
    assert out[-1].startswith("no run for: nyuv2/linear, kitti/linear, ade20k/dpt")


def test_report_puts_baselines_beside_pixio(tmp_path, capsys):
    patch14 = {"patch_size": 14, "crop_size": 252, "window": 252, "stride": 168,
               "reference": {"crop_size": 256, "window": 256, "stride": 170}, "as_reference": False}  # fmt: skip
    fake_run(tmp_path / "pixio", "depth", "nyuv2", "dpt", [80.0, 93.25])
    fake_run(tmp_path / "mae", "depth", "nyuv2", "dpt", [70.0, 69.0], "transformers", "vit_mae",
             extra={"protocol": patch14})  # fmt: skip
    fake_run(tmp_path / "r50_a", "depth", "nyuv2", "dpt", [60.0], "timm", "vit_base_r50_s16_224")
    fake_run(tmp_path / "r50_b", "depth", "nyuv2", "dpt", [65.0], "timm", "vit_base_r50_s16_224")
    knn = {"top1": {"20": 55.5}, "top5": {"20": 77.0}, "encoder": "vit_mae",
           "encoder_source": "transformers",
           "protocol": {"patch_size": 14, "resize": 256, "crop": 252,
                        "reference": {"resize": 256, "crop": 256}, "as_reference": False}}  # fmt: skip
    (tmp_path / "knn_mae").mkdir()
    (tmp_path / "knn_mae" / "results.json").write_text(json.dumps(knn))
    assert report.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    print(printed)  # the report, for `pytest -s`
    out = printed.splitlines()
    header, cells = comparison(out)
    mae, r50 = "transformers:vit_mae", "timm:vit_base_r50_s16_224"
    columns = ["pixio_vith16@abababab", f"{r50}@abababab", mae, f"{mae}@abababab"]
    assert header == ["task", "dataset", "head", *columns, *report.PAPER_COLUMNS]
    # pixio, timm (best of two runs of one checkpoint), transformers without a recorded digest
    # (the k-NN file), transformers, Pixio paper, MAE paper
    assert cells["depth", "nyuv2", "dpt"] == ["93.25", "65.00+", "-", "70.00", "95.50", "80.80"]
    assert cells["knn", "imagenet", "k=20"] == ["-", "-", "55.50", "-", "-", "-"]
    assert list(cells) == [("depth", "nyuv2", "dpt"), ("knn", "imagenet", "k=20")]
    runs = {line.split()[-1]: line.split() for line in run_lines(out)[2:]}
    assert runs["mae"][3:10] == [
        mae,
        "encoder.pth@abababab",
        "d1",
        "252/252/168",
        "70.00",
        "(1)",
        "69.00",
    ]
    assert runs["pixio"][3:7] == ["pixio_vith16", "encoder.pth@abababab", "d1", "-"]
    assert runs["r50_a"][3:8] == [r50, "encoder.pth@abababab", "d1", "-", "60.00"]
    assert runs["r50_b"][3:8] == [r50, "encoder.pth@abababab", "d1", "-", "65.00"]
    assert runs["knn_mae"][:5] == ["knn", "imagenet", "k=20", mae, "-"]
    assert runs["knn_mae"][8:11] == ["256/252", "55.50", "55.50"]  # metric: top1 (top5 77.00)
    note = "\n".join(out)
    assert "reference 256/256/170 (k-NN 256/256)" in note and "(patch 14: 252/252/168)" in note
    assert report.COMPARISON_NOTE.startswith("+ best of several runs; * incomplete run")


def test_report_cli_without_results_fails_clearly(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "evaluation.report", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1 and "no results.json or val_results.json" in run.stderr


def test_bad_files_are_skipped_and_named_and_the_rest_reported(tmp_path, capsys):
    fake_run(tmp_path / "good", "depth", "nyuv2", "dpt", [80.0, 93.25])
    fake_run(tmp_path / "cut", "depth", "kitti", "dpt", [70.0])
    cut = tmp_path / "cut" / "results.json"
    cut.write_text(cut.read_text()[:100])  # truncated; its val_results.json has no best either
    nulls = tmp_path / "nulls" / "results.json"
    nulls.parent.mkdir()
    nulls.write_text(json.dumps({"task": None, "dataset": None, "head": None, "best": None}))
    knn_nulls = tmp_path / "knn" / "results.json"
    knn_nulls.parent.mkdir()
    knn_nulls.write_text(json.dumps({"task": "knn", "top1": {"10": None}, "encoder": "x"}))
    (tmp_path / "dir" / "results.json").mkdir(parents=True)  # cannot be read as a file
    binary = tmp_path / "running" / "val_results.json"
    binary.parent.mkdir()
    binary.write_bytes(b"\xff\xfe\x00garbage")
    # A results.json that does not read, beside a val_results.json that does: shown incomplete.
    fake_run(tmp_path / "fallback", "semseg", "ade20k", "linear", [40.0])
    (tmp_path / "fallback" / "val_results.json").write_text(json.dumps({"metric": "miou", "best": {"miou": 41.5, "epoch": 1.0}}))  # fmt: skip
    (tmp_path / "fallback" / "results.json").write_text("")
    (tmp_path / "fallback" / "config.yaml").write_text("dataset:\n  name: ade20k\nhead:\n  name: linear\nencoder:\n  name: pixio_vith16\n")  # fmt: skip
    # A readable val_results.json whose config.yaml does not parse: skipped, naming the yaml.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "val_results.json").write_text(json.dumps({"metric": "d1", "best": {"d1": 1.0}}))
    (broken / "config.yaml").write_text("dataset: [unclosed\n")
    assert report.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    skipped = sorted(captured.err.splitlines())
    assert skipped.pop(0).startswith(f"skipped {broken / 'config.yaml'}: cannot be read (")
    assert skipped == sorted([
        f"skipped {cut}: not valid JSON, cut short? (Unterminated string starting at: line 7 column 3)",
        f"skipped {tmp_path / 'cut' / 'val_results.json'}: `best` is null, not a validation record",
        f"skipped {tmp_path / 'dir' / 'results.json'}: cannot be read (Is a directory)",
        f"skipped {tmp_path / 'fallback' / 'results.json'}: empty",
        f"skipped {knn_nulls}: `top1.10` is null, not an accuracy",
        f"skipped {nulls}: `task` is null, not one of depth, semseg, linear or knn",
        f"skipped {binary}: cannot be read ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)",
    ])  # fmt: skip
    runs = {line.split()[-1]: line.split() for line in run_lines(captured.out.splitlines())[2:]}
    assert list(runs) == ["good", "incomplete"]
    assert runs["good"][7:9] == ["93.25", "(2)"]
    assert runs["incomplete"][:4] == ["semseg", "ade20k", "linear", "pixio_vith16"]
    assert runs["incomplete"][7:9] == ["41.50", "(1)"] and runs["incomplete"][-2] == "fallback"
    assert captured.out.splitlines()[-1] == "skipped 8 file(s) that could not be read (named on stderr)"  # fmt: skip


def test_nothing_readable_exits_1_naming_every_file(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text("{")
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"skipped {tmp_path / 'a' / 'results.json'}: not valid JSON")
    assert err[1] == f"error: nothing to report under {tmp_path}: 1 unreadable file(s), listed above"  # fmt: skip


def test_random_weight_runs_are_marked_and_never_beside_published_numbers(tmp_path, capsys):
    fake_run(tmp_path / "trained", "depth", "nyuv2", "dpt", [90.0])
    fake_run(tmp_path / "demo", "depth", "nyuv2", "dpt", [97.0], name="pixio_vitt16", sha256=None)
    knn = {"task": "knn", "top1": {"10": 95.0, "5": 96.0}, "top5": {"10": 99.0, "5": 99.5},
           "encoder": "pixio_vitt16", "checkpoint_sha256": None, "random_weights": True}  # fmt: skip
    (tmp_path / "knn_demo").mkdir()
    (tmp_path / "knn_demo" / "results.json").write_text(json.dumps(knn))
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["encoder"]["random_weights"]  # fmt: skip
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    header, cells = comparison(out)
    assert header == ["task", "dataset", "head", "pixio_vith16@abababab", *report.PAPER_COLUMNS]
    assert cells == {("depth", "nyuv2", "dpt"): ["90.00", "95.50", "80.80"]}  # no demo numbers
    marked = [line.split() for line in run_lines(out)[2:] if line.endswith(report.RANDOM_MARK)]
    assert [r[-2] for r in marked] == ["demo", "knn_demo", "knn_demo"]
    assert marked[0][3:12] == ["pixio_vitt16", "random", "d1", "-", "97.00", "(1)", "97.00", "-", "-"]  # fmt: skip
    assert [r[2] for r in marked[1:]] == ["k=5", "k=10"]  # by k, not as text
    assert marked[2][-6:] == ["95.00", "-", "-", "-", "knn_demo", report.RANDOM_MARK]  # fmt: skip
    assert report.RANDOM_NOTE in out
    # Only random-weight runs: no side-by-side table at all, every run still listed.
    for run in ("trained",):
        for f in (tmp_path / run).iterdir():
            f.unlink()
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == report.NO_COMPARISON and len(run_lines(out)) == 5


def test_two_checkpoints_of_one_architecture_are_two_columns(tmp_path, capsys):
    # Two checkpoints of pixio_vith16 (e.g. two pre-training runs): never one column holding the
    # better of them; each run names its checkpoint (file and short digest).
    fake_run(tmp_path / "early", "depth", "nyuv2", "dpt", [80.0], sha256="11" * 32)
    fake_run(tmp_path / "late", "depth", "nyuv2", "dpt", [90.0], sha256="22" * 32)
    fake_run(tmp_path / "late_again", "depth", "nyuv2", "dpt", [85.0], sha256="22" * 32)
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    header, cells = comparison(out)
    assert header[3:5] == ["pixio_vith16@11111111", "pixio_vith16@22222222"]
    assert cells["depth", "nyuv2", "dpt"] == ["80.00", "90.00+", "95.50", "80.80"]
    runs = {line.split()[-1]: line.split() for line in run_lines(out)[2:]}
    assert runs["early"][4] == "encoder.pth@11111111"
    assert runs["late"][4] == runs["late_again"][4] == "encoder.pth@22222222"


def test_demo_runs_are_labelled_and_never_beside_published_numbers(tmp_path, capsys):
    # A demo run with a trained encoder (make demo's): its data is a demo set, so its number
    # stands beside no published one, whatever it is.
    fake_run(tmp_path / "real", "semseg", "ade20k", "linear", [48.0])
    fake_run(tmp_path / "demo", "semseg", "ade20k", "linear", [93.7], demo=True)
    knn = {"task": "knn", "dataset": "imagenet", "demo": True, "head": None, "metric": "top1",
           "best": {"label": "best over k", "k": 5, "top1": 96.0, "top5": 99.5},
           "final": {"label": "largest k", "k": 10, "top1": 95.0, "top5": 99.0},
           "top1": {"5": 96.0, "10": 95.0}, "top5": {"5": 99.5, "10": 99.0},
           "encoder": {"source": "pixio", "name": "pixio_vitt16", "sha256": "cd" * 32,
                       "checkpoint": "/x/encoder.safetensors", "module": None,
                       "random_weights": False}}  # fmt: skip
    (tmp_path / "knn_demo").mkdir()
    (tmp_path / "knn_demo" / "results.json").write_text(json.dumps(knn))
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    header, cells = comparison(out)
    assert header == ["task", "dataset", "head", "pixio_vith16@abababab", *report.PAPER_COLUMNS]
    assert cells == {("semseg", "ade20k", "linear"): ["48.00", "50.20", "-"]}
    runs = {line.split()[-1]: line.split() for line in run_lines(out)[2:]}
    assert runs["demo"][1] == "demo-ade20k" and runs["demo"][7:12] == ["93.70", "(1)", "93.70", "-", "-"]  # fmt: skip
    demo_knn = [line.split() for line in run_lines(out)[2:] if line.startswith("knn")]
    assert [(r[1], r[2], r[4]) for r in demo_knn] == [
        ("demo-imagenet", "k=5", "encoder.safetensors@cdcdcdcd"),
        ("demo-imagenet", "k=10", "encoder.safetensors@cdcdcdcd"),
    ]
    assert all(r[-3:-1] == ["-", "-"] for r in demo_knn)
    assert report.DEMO_NOTE in out and not any(line.startswith("no run for") and "ade20k/linear" in line for line in out)  # fmt: skip


def test_linear_probe_results_are_head_runs_for_the_shared_reader(tmp_path):
    """A linear probe's results.json is read and its output folder guarded by the functions of the
    depth / segmentation runs (task `linear` is a head task); its lr grid is checked like `best`
    and `final`, for every head task."""
    from evaluation.results import ResultsFileError, app_identity, owner_problem, read_results

    row = {"epoch": 4.0, "iteration": 24, "top1": 61.5, "top5": 90.0}
    record = {"task": "linear", "dataset": "imagenet", "demo": False, "head": "cls", "metric": "top1",
              "best": {"label": "best over epochs", "head": "head_lr0.1", **row},
              "final": {"label": "final epoch", "head": "head_lr0.1", **row},
              "reported_head": "head_lr0.1", "grid": {"head_lr0.1": {"blr": 0.1, "best": row, "final": row}},
              "encoder": {"source": "pixio", "name": "pixio_vith16", "module": None, "sha256": "ab" * 32}}  # fmt: skip
    path = tmp_path / "probe" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(record))
    assert read_results(path) == record
    encoder = {"source": "pixio", "name": "pixio_vith16", "module": None}
    assert owner_problem(path.parent, app_identity("linear", encoder, "imagenet", "cls", sha256="ab" * 32)) is None  # fmt: skip
    other = owner_problem(path.parent, app_identity("linear", encoder, "imagenet", "avgpool"))
    assert f"{path.parent} holds the results of another run (results.json: linear imagenet cls of pixio_vith16 (sha256 abababab" in other  # fmt: skip
    depth = owner_problem(path.parent, app_identity("depth", encoder, "nyuv2", "dpt"))
    assert depth.startswith(f"{path.parent} holds the results of another run (results.json: linear imagenet cls")  # fmt: skip
    record["grid"]["head_lr0.1"]["final"] = None
    path.write_text(json.dumps(record))
    with pytest.raises(ResultsFileError) as err:
        read_results(path)
    assert str(err.value) == f"{path}: `grid.head_lr0.1.final` is null, not a validation record"
