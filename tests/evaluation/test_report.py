"""`python -m evaluation.report ROOT`: one table of the results.json files of several runs (written
here by the apps' own `write_results`), labelled best and final, beside the SPEC section 8 numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from evaluation import report
from evaluation.common import write_results

REPO = Path(__file__).resolve().parents[2]


def fake_run(out: Path, app: str, dataset: str, head: str, values: list[float]) -> None:
    """A finished run's files as the trainer leaves them (4 iterations per epoch), then
    results.json through the app's writer."""
    metric = "d1" if app == "depth" else "miou"
    out.mkdir(parents=True)
    rows = [{"step": 4 * (e + 1), "epoch": float(e + 1), f"val/{metric}": v, "val/samples": 3.0}
            for e, v in enumerate(values)]  # fmt: skip
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "val_results.json").write_text(json.dumps({"metric": metric, "mode": "max"}))
    config = {"encoder": {"name": "pixio_vith16", "checkpoint": None},
              "dataset": {"name": dataset}, "head": {"name": head}}  # fmt: skip
    write_results(out, app, config, iters_per_epoch=4)


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
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[-1]: line.split() for line in lines if line.split()[-1:] != []}
    nyu = next(line for line in lines if line.startswith("depth") and "nyuv2" in line).split()
    assert nyu[:5] == ["depth", "nyuv2", "dpt", "pixio_vith16", "d1"]
    assert nyu[5:10] == ["93.25", "(2)", "92.50", "95.50", "80.80"]  # best (epoch), final, paper
    loveda = next(line for line in lines if "loveda" in line).split()
    assert loveda[5:10] == ["51.50", "(2)", "51.50", "53.90", "-"]
    assert "incomplete" in row and row["incomplete"][:3] == ["depth", "kitti", "dpt"]
    assert row["incomplete"][5:8] == ["60.00", "(1)", "55.00"]
    knn_rows = [line.split() for line in lines if line.startswith("knn")]
    assert [r[2] for r in knn_rows] == ["k=10", "k=20"] and knn_rows[1][7] == "71.25"
    # Depth rows first, then segmentation, then k-NN; the cells without a run are named.
    tasks = [line.split()[0] for line in lines[2:] if line.split()[0] in ("depth", "semseg", "knn")]
    assert tasks == ["depth", "depth", "semseg", "knn", "knn"]
    assert lines[-1].startswith("no run for: nyuv2/linear, kitti/linear, ade20k/dpt")


def test_report_cli_without_results_fails_clearly(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "evaluation.report", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1 and "no results.json or val_results.json" in run.stderr
