"""One table of every evaluation under an output root, beside the published numbers (SPEC 8).

    python -m evaluation.report outputs/eval/pixio_vith16

Reads each `results.json` below the root: depth and segmentation runs (best over epochs and
final, labelled) and k-NN runs (top-1 / top-5 per k). A run folder with `val_results.json` but
no `results.json` yet (running, or stopped) is shown from that file and marked `incomplete`. The
published ViT-H/16 numbers of the paper, and those of MAE ViT-H/14, are printed beside ours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (dataset, head) -> headline metric of Pixio ViT-H/16 (631M), frozen encoder: d1 % / mIoU %.
PUBLISHED: dict[tuple[str, str], float] = {
    ("nyuv2", "dpt"): 95.5, ("nyuv2", "linear"): 90.8,
    ("kitti", "dpt"): 96.7, ("kitti", "linear"): 90.3,
    ("ade20k", "dpt"): 53.6, ("ade20k", "linear"): 50.2,
    ("pascal", "dpt"): 85.9, ("pascal", "linear"): 82.2,
    ("loveda", "dpt"): 54.7, ("loveda", "linear"): 53.9,
}  # fmt: skip
# MAE ViT-H/14 on the same protocol (SPEC 8).
PUBLISHED_MAE: dict[tuple[str, str], float] = {("nyuv2", "dpt"): 80.8, ("ade20k", "dpt"): 37.6}
TASK_OF = {"nyuv2": "depth", "kitti": "depth", "ade20k": "semseg", "pascal": "semseg", "loveda": "semseg"}  # fmt: skip
HEADLINE = {"depth": "d1", "semseg": "miou"}
COLUMNS = ("task", "dataset", "head", "encoder", "metric", "best (epoch)", "final",
           "Pixio H/16 paper", "MAE H/14 paper", "run")  # fmt: skip


@dataclass
class Row:
    task: str
    dataset: str
    head: str
    encoder: str
    metric: str
    best: float
    best_epoch: float | None
    final: float | None
    run: str
    status: str = ""

    def cells(self) -> list[str]:
        epoch = "" if self.best_epoch is None else f" ({self.best_epoch:g})"
        key = (self.dataset, self.head)
        return [self.task, self.dataset, self.head, self.encoder, self.metric,
                f"{_num(self.best)}{epoch}", _num(self.final), _num(PUBLISHED.get(key)),
                _num(PUBLISHED_MAE.get(key)), f"{self.run}{' ' + self.status if self.status else ''}"]  # fmt: skip


def _num(value: float | None) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
    )


def head_rows(results: dict[str, Any], run: str) -> list[Row]:
    """The row of a depth / segmentation results.json."""
    metric = results["metric"]
    best, final = results["best"], results["final"]
    enc = results["encoder"]["name"]
    return [Row(results["task"], results["dataset"], results["head"], enc, metric,
                best[metric], best.get("epoch"), final[metric], run)]  # fmt: skip


def knn_rows(results: dict[str, Any], run: str) -> list[Row]:
    """One row per k of a k-NN results.json (top-1 as best and final; top-5 in the metric)."""
    rows = []
    for k, top1 in sorted(results["top1"].items(), key=lambda kv: int(kv[0])):
        top5 = results.get("top5", {}).get(k)
        metric = f"top1 (top5 {_num(top5)})"
        rows.append(Row("knn", "imagenet", f"k={k}", str(results.get("encoder", "?")), metric,
                        top1, None, top1, run))  # fmt: skip
    return rows


def incomplete_rows(record: dict[str, Any], run_dir: Path, run: str) -> list[Row]:
    """A run without results.json: its val_results.json, with task / dataset / head from its
    config.yaml when there is one."""
    config = _read_yaml(run_dir / "config.yaml")
    dataset = (config.get("dataset") or {}).get("name", "?")
    head = (config.get("head") or {}).get("name", "?")
    encoder = (config.get("encoder") or {}).get("name", "?")
    metric, best, last = record.get("metric"), record.get("best") or {}, record.get("last") or {}
    if metric is None or metric not in best:
        return []
    return [Row(TASK_OF.get(dataset, "?"), dataset, head, encoder, metric, best[metric],
                best.get("epoch"), last.get(metric), run, "incomplete")]  # fmt: skip


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path)) or {}  # type: ignore[return-value]


def collect(root: str | Path) -> list[Row]:
    """Rows of every run below `root`, sorted by task, dataset, head."""
    root = Path(root)
    rows: list[Row] = []
    for path in sorted(root.rglob("results.json")):
        run = str(path.parent.relative_to(root)) or "."
        results = json.loads(path.read_text())
        rows += knn_rows(results, run) if "top1" in results else head_rows(results, run)
    done = {p.parent for p in root.rglob("results.json")}
    for path in sorted(root.rglob("val_results.json")):
        if path.parent not in done:
            record = json.loads(path.read_text())
            rows += incomplete_rows(record, path.parent, str(path.parent.relative_to(root)))
    order = {"depth": 0, "semseg": 1, "knn": 2}
    return sorted(rows, key=lambda r: (order.get(r.task, 3), r.dataset, r.head, r.run))


def format_table(rows: list[Row]) -> str:
    """Aligned text table, one line per row, with the published numbers."""
    table = [list(COLUMNS), *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def missing(rows: list[Row]) -> list[str]:
    """The dataset x head cells of the published table that no run covers."""
    found = {(r.dataset, r.head) for r in rows}
    return [f"{d}/{h}" for d, h in PUBLISHED if (d, h) not in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_root", help="folder holding the runs (searched recursively)")
    args = parser.parse_args(argv)
    if not Path(args.output_root).is_dir():
        print(f"error: {args.output_root} is not a directory", file=sys.stderr)
        return 1
    rows = collect(args.output_root)
    if not rows:
        print(
            f"error: no results.json or val_results.json under {args.output_root}", file=sys.stderr
        )
        return 1
    print(format_table(rows))
    print("best = best over epochs (the number the paper reports); final = last epoch. "
          "Depth: d1 %; segmentation: mIoU %; k-NN: top-1 %.")  # fmt: skip
    if gaps := missing(rows):
        print(f"no run for: {', '.join(gaps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
