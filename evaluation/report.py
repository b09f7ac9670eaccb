"""Two tables of every evaluation under an output root, beside the published numbers (SPEC 8).

    python -m evaluation.report outputs/eval/pixio_vith16

Reads each `results.json` below the root: depth and segmentation runs (best over epochs and
final, labelled) and k-NN runs (top-1 / top-5 per k). A run folder with `val_results.json` but
no `results.json` yet (running, or stopped) is shown from that file and marked `incomplete`.
Encoders are labelled by name for Pixio and `source:name` for a baseline (`timm:...`,
`transformers:...`).

The first table puts the encoders side by side: one line per task / dataset / head (k-NN: per
k), one column per encoder with its headline number (best over epochs; k-NN top-1), then the
published ViT-H/16 numbers of the paper and those of MAE ViT-H/14. The second lists every run
with its sizes (crop/window/stride; k-NN resize/crop), its best and final numbers, and the
published ones.
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
PAPER_COLUMNS = ("Pixio H/16 paper", "MAE H/14 paper")
COLUMNS = ("task", "dataset", "head", "encoder", "metric", "sizes", "best (epoch)", "final",
           *PAPER_COLUMNS, "run")  # fmt: skip
TASK_ORDER = {"depth": 0, "semseg": 1, "knn": 2}
PIXIO = "pixio"
COMPARISON_TITLE = "side by side (best over epochs; k-NN top-1)"
COMPARISON_NOTE = "+ best of several runs; * incomplete run; - no run."
RUNS_NOTE = (
    "best = best over epochs (the number the paper reports); final = last epoch. "
    "Depth: d1 %; segmentation: mIoU %; k-NN: top-1 %.\n"
    "sizes = crop/window/stride (k-NN: resize/crop) used; reference 256/256/170 (k-NN 256/256); "
    "a baseline of another patch size uses the largest multiple of its patch up to 256 "
    "(patch 14: 252/252/168); - = not recorded."
)


def encoder_label(source: str, name: str) -> str:
    """The plain name for Pixio; `source:name` for a baseline encoder."""
    return name if source == PIXIO else f"{source}:{name}"


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
    source: str = PIXIO
    sizes: str = "-"

    @property
    def label(self) -> str:
        return encoder_label(self.source, self.encoder)

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.task, self.dataset, self.head)

    def cells(self) -> list[str]:
        epoch = "" if self.best_epoch is None else f" ({self.best_epoch:g})"
        status = f" {self.status}" if self.status else ""
        return [self.task, self.dataset, self.head, self.label, self.metric, self.sizes,
                f"{_num(self.best)}{epoch}", _num(self.final), *_published(self.dataset, self.head),
                f"{self.run}{status}"]  # fmt: skip


def _num(value: float | None) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
    )


def _published(dataset: str, head: str) -> list[str]:
    """The paper's Pixio H/16 and MAE H/14 numbers for a cell (`-` where none)."""
    key = (dataset, head)
    return [_num(PUBLISHED.get(key)), _num(PUBLISHED_MAE.get(key))]


def _sizes(protocol: dict[str, Any] | None, keys: tuple[str, ...]) -> str:
    """`a/b/c` of the protocol's sizes used, `-` when the run recorded none (older files)."""
    if not protocol or any(k not in protocol for k in keys):
        return "-"
    return "/".join(str(protocol[k]) for k in keys)


def head_rows(results: dict[str, Any], run: str) -> list[Row]:
    """The row of a depth / segmentation results.json."""
    metric = results["metric"]
    best, final, enc = results["best"], results["final"], results["encoder"]
    sizes = _sizes(results.get("protocol"), ("crop_size", "window", "stride"))
    return [Row(results["task"], results["dataset"], results["head"], enc["name"], metric,
                best[metric], best.get("epoch"), final[metric], run,
                source=enc.get("source", PIXIO), sizes=sizes)]  # fmt: skip


def knn_rows(results: dict[str, Any], run: str) -> list[Row]:
    """One row per k of a k-NN results.json (top-1 as best and final; top-5 in the metric)."""
    source = results.get("encoder_source", PIXIO)  # older files: Pixio only
    sizes = _sizes(results.get("protocol"), ("resize", "crop"))
    rows = []
    for k, top1 in sorted(results["top1"].items(), key=lambda kv: int(kv[0])):
        metric = f"top1 (top5 {_num(results.get('top5', {}).get(k))})"
        rows.append(Row("knn", "imagenet", f"k={k}", str(results.get("encoder", "?")), metric,
                        top1, None, top1, run, source=source, sizes=sizes))  # fmt: skip
    return rows


def incomplete_rows(record: dict[str, Any], run_dir: Path, run: str) -> list[Row]:
    """A run without results.json: its val_results.json, with task / dataset / head / encoder
    from its config.yaml when there is one."""
    config = _read_yaml(run_dir / "config.yaml")
    dataset = (config.get("dataset") or {}).get("name", "?")
    head = (config.get("head") or {}).get("name", "?")
    encoder = config.get("encoder") or {}
    metric, best, last = record.get("metric"), record.get("best") or {}, record.get("last") or {}
    if metric is None or metric not in best:
        return []
    return [Row(TASK_OF.get(dataset, "?"), dataset, head, encoder.get("name", "?"), metric,
                best[metric], best.get("epoch"), last.get(metric), run, "incomplete",
                source=encoder.get("source") or PIXIO)]  # fmt: skip


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
    return sorted(rows, key=lambda r: (TASK_ORDER.get(r.task, 3), r.dataset, r.head, r.run))


def _align(header: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell, a dashed rule under the header."""
    table = [header, *body]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_table(rows: list[Row]) -> str:
    """Aligned text table, one line per run (per k for k-NN), with the published numbers."""
    return _align(list(COLUMNS), [r.cells() for r in rows])


def encoder_columns(rows: list[Row]) -> list[str]:
    """The encoder labels of the runs: Pixio's first, then the baselines, each group sorted."""
    source = {r.label: r.source for r in rows}
    return sorted(source, key=lambda label: (source[label] != PIXIO, label))


def _score(row: Row) -> float:
    # NaN (a diverged run) must not win the max over an encoder's runs
    return -math.inf if math.isnan(row.best) else row.best


def best_cell(runs: list[Row]) -> str:
    """One encoder's headline in one cell: its best run, `+` when it had several, `*` when the
    shown run is incomplete, `-` when it had none."""
    if not runs:
        return "-"
    top = max(runs, key=_score)
    return f"{_num(top.best)}{'*' if top.status else ''}{'+' if len(runs) > 1 else ''}"


def format_comparison(rows: list[Row]) -> str:
    """One line per task / dataset / head (k-NN: per k), one column per encoder label, then the
    paper's numbers; lines in the order of `rows` (as `collect` sorts them)."""
    labels = encoder_columns(rows)
    cells = list(dict.fromkeys(r.cell for r in rows))  # first-seen order keeps collect's sort
    body = []
    for task, dataset, head in cells:
        here = [r for r in rows if r.cell == (task, dataset, head)]
        values = [best_cell([r for r in here if r.label == label]) for label in labels]
        body.append([task, dataset, head, *values, *_published(dataset, head)])
    return _align(["task", "dataset", "head", *labels, *PAPER_COLUMNS], body)


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
    print(COMPARISON_TITLE, format_comparison(rows), COMPARISON_NOTE, "", sep="\n")
    print("every run", format_table(rows), RUNS_NOTE, sep="\n")
    if gaps := missing(rows):
        print(f"no run for: {', '.join(gaps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
