"""`python -m evaluation.report` for runs with a grid of heads and a selection rule: one row per
lr under the run's, the rule beside every number (every-run table) and as a mark (side by
side), and `--per-class` printing the reported result's per-class / per-depth-bin table."""

from __future__ import annotations

import json

from app_helpers import fake_history

from evaluation import report
from evaluation.grid import metric_key
from evaluation.head_job import write_results

ENCODER = {"name": "pixio_vith16", "checkpoint": "/ckpt/encoder.pth", "sha256": "ab" * 32}


def grid_run(out, rule: str, app: str = "depth", dataset: str = "nyuv2") -> dict:
    """A finished 2-head run (metrics.jsonl, val_results.json, tables) and its results.json."""
    metric = "d1" if app == "depth" else "miou"
    heads = ("head_lr0.001", "head_lr0.01")
    rows = [{metric: max(a, b), metric_key(heads[0], metric): a, metric_key(heads[1], metric): b} for a, b in ((70.0, 80.0), (90.0, 85.0))]  # fmt: skip
    if app == "depth":
        table = [{"from": 0.0, "to": 1.0, "pixels": 12, "d1": 91.5, "abs_rel": 0.0625}]
    else:
        table = [{"class": 0, "name": "wall", "iou": 75.25, "acc": 80.0, "pixels": 40}]
    fake_history(out, rows, metric, tables={4: {heads[0]: table}})
    config = {"encoder": ENCODER, "dataset": {"name": dataset}, "head": {"name": "dpt", "lrs": [1e-3, 1e-2]},
              "data": {}, "eval": {"select": rule, "holdout_fraction": 0.1}}  # fmt: skip
    measured = {"row": {"epoch": 2.0, "iteration": 4, metric: 88.5, "samples": 7.0}, "table": table}
    return write_results(out, app, config, 2, measured=measured if rule == "holdout" else None)


def every_run(lines: list[str]) -> list[list[str]]:
    start = next(i for i, line in enumerate(lines) if line.split()[:6] == list(report.COLUMNS[:6]))
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("best = "))
    return [line.split() for line in lines[start + 2 : end]]


def test_grid_rows_and_rules_beside_every_number(tmp_path, capsys):
    results = grid_run(tmp_path / "held", "holdout")
    assert results["best"]["d1"] == 88.5 and results["final"]["split"] == "holdout"
    grid_run(tmp_path / "ref", "reference", "semseg", "ade20k")
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = every_run(out)
    # run row, then one row per lr; the rule in the column before the run folder
    depth = [r for r in rows if r[0] == "depth"]
    assert [r[2:4] for r in depth[1:]] == [["dpt", "head_lr0.001"], ["dpt", "head_lr0.01"]]
    assert depth[0][2:10] == ["dpt", "pixio_vith16", "encoder.pth@abababab", "d1", "(head_lr0.001)", "-", "88.50", "(2)"]  # fmt: skip
    assert depth[1][8:11] == ["90.00", "(2)", "90.00"] and depth[2][8:11] == [
        "85.00",
        "(2)",
        "85.00",
    ]  # holdout
    assert [r[-2:] for r in depth] == [["holdout", "held"]] * 3
    seg = [r for r in rows if r[0] == "semseg"]
    assert seg[0][8:10] == ["90.00", "(2)"] and [r[-2] for r in seg] == ["val-best"] * 3
    # side by side: one line per cell (not one per lr), the holdout run marked h
    start = out.index(report.COMPARISON_TITLE) + 3
    cells = {tuple(line.split()[:3]): line.split()[3] for line in out[start : out.index(report.COMPARISON_NOTE)]}  # fmt: skip
    assert cells == {("depth", "nyuv2", "dpt"): "88.50h", ("semseg", "ade20k", "dpt"): "90.00"}


def test_per_class_prints_the_reported_results_table(tmp_path, capsys):
    grid_run(tmp_path / "held", "holdout")
    grid_run(tmp_path / "ref", "reference", "semseg", "ade20k")
    assert report.main([str(tmp_path), "--per-class"]) == 0
    out = capsys.readouterr().out
    depth = out[out.index("depth nyuv2 dpt of pixio_vith16 (held)") :].splitlines()
    assert depth[0].endswith("head head_lr0.001, epoch 2.0, val split, rule holdout")
    assert depth[1].split() == ["gt", "depth", "(m)", "pixels", "d1", "%", "abs_rel"]
    assert depth[3].split() == ["0-1", "12", "91.50", "0.06"]
    seg = out[out.index("semseg ade20k dpt of pixio_vith16 (ref)") :].splitlines()
    assert seg[0].endswith("head head_lr0.001, epoch 2.0, val split, rule val-best")
    assert seg[3].split() == ["0", "wall", "75.25", "80.00", "40"]
    assert report.main([str(tmp_path)]) == 0  # without the flag: no tables
    assert "gt depth (m)" not in capsys.readouterr().out
    assert json.loads((tmp_path / "ref" / "results.json").read_text())["per_class"]["head"] == "head_lr0.001"  # fmt: skip
