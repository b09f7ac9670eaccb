"""Two tables of every evaluation under an output root, beside the published numbers
(docs/reproduction.md).

    python -m evaluation.report outputs/eval/pixio_vith16

Reads each `results.json` below the root: depth and segmentation runs (the reported result and
the final one, labelled with the rule that chose them, `eval.select`; a grid of lrs: one row per
head under the run's), k-NN runs (top-1 / top-5 per k) and linear probes (the reported head's top-1,
then one row per head of its lr grid). A run folder with `val_results.json` but
no `results.json` yet (running, or stopped) is shown from that file and marked `incomplete`.
Encoders are labelled by name for Pixio and `source:name` for a baseline (`timm:...`,
`transformers:...`), followed by `@` and the first 8 hex digits of their checkpoint's sha256.

The first table puts the encoders side by side: one line per task / dataset / head (k-NN: per
k), one column per checkpoint (two checkpoints of one architecture are two columns, never one
holding the better of them) with its headline number (best over epochs; k-NN top-1), then the
published ViT-H/16 numbers of the paper and those of MAE ViT-H/14. The second lists every run
with its checkpoint (short digest and file name), its sizes (crop/window/stride; k-NN
resize/crop), its best and final numbers, and the published ones.

A run on demo data (`demo` in results.json: the demo experiments' tiny generated sets) is
listed as `demo-<dataset>` and a run of random weights (a demo without a checkpoint:
`random_weights`) is marked `random-weights`; either stands in the second table beside no
published number, and is left out of the first. A file that cannot be read, is cut short or lacks a finished run's values is skipped and
named on stderr (`skipped <file>: <why>`); the rest is reported. Exit status 1 only when nothing
could be reported. `--per-class` also prints each run's table of its reported result: IoU,
accuracy and pixels per class (segmentation), d1, abs_rel and pixels per ground-truth depth bin
(depth).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.results import (
    PIXIO,
    RESULTS_FILE,
    VAL_RESULTS_FILE,
    ResultsFileError,
    encoder_of,
    is_knn,
    is_random,
    read_results,
    read_val_results,
)

# (dataset, head) -> headline metric of Pixio ViT-H/16 (631M), frozen encoder: d1 % / mIoU %.
PUBLISHED: dict[tuple[str, str], float] = {
    ("nyuv2", "dpt"): 95.5, ("nyuv2", "linear"): 90.8,
    ("kitti", "dpt"): 96.7, ("kitti", "linear"): 90.3,
    ("ade20k", "dpt"): 53.6, ("ade20k", "linear"): 50.2,
    ("pascal", "dpt"): 85.9, ("pascal", "linear"): 82.2,
    ("loveda", "dpt"): 54.7, ("loveda", "linear"): 53.9,
}  # fmt: skip
# MAE ViT-H/14 on the same protocol (the paper).
PUBLISHED_MAE: dict[tuple[str, str], float] = {("nyuv2", "dpt"): 80.8, ("ade20k", "dpt"): 37.6}
TASK_OF = {"nyuv2": "depth", "kitti": "depth", "ade20k": "semseg", "pascal": "semseg", "loveda": "semseg"}  # fmt: skip
HEADLINE = {"depth": "d1", "semseg": "miou"}
PAPER_COLUMNS = ("Pixio H/16 paper", "MAE H/14 paper")
COLUMNS = ("task", "dataset", "head", "encoder", "checkpoint", "metric", "sizes", "best (epoch)",
           "final", *PAPER_COLUMNS, "rule", "run")  # fmt: skip
# eval.select -> the every-run table's `rule` cell, and the side-by-side table's mark
RULE_CELLS = {"reference": "val-best", "last": "val-last", "holdout": "holdout",
              "holdout-running": "holdout-only"}  # fmt: skip
RULE_MARKS = {"last": "l", "holdout": "h"}
TASK_ORDER = {"depth": 0, "semseg": 1, "knn": 2, "linear": 3}
LINEAR_TASK = "linear"  # evaluation.linear's results.json
RANDOM_MARK = "random-weights"
COMPARISON_TITLE = (
    "side by side (best over epochs; k-NN top-1; linear probe: the reported head's top-1)"
)
COMPARISON_NOTE = (
    "+ best of several runs; * incomplete run; - no run; h chosen on a holdout of the training "
    "split, the validation split measured once; l last epoch."
)
NO_COMPARISON = (
    "(no run of a trained encoder on real data: nothing to put beside the published numbers)"
)
DEMO_PREFIX = "demo-"
DEMO_NOTE = (
    f"{DEMO_PREFIX}<dataset>: a demo experiment's tiny generated set in that dataset's layout; "
    "its numbers show that the head learns, they measure no encoder: they stand beside no "
    "published number and are left out of the side-by-side table."
)
DIGEST_CHARS = 8  # of the checkpoint's sha256 in labels
RANDOM_NOTE = (
    f"{RANDOM_MARK}: a demo's encoder without a checkpoint; its numbers measure no encoder, so "
    "they stand beside no published number and are left out of the side-by-side table."
)
RUNS_NOTE = (
    "best = the reported result, final = the last epoch, by the run's rule (eval.select): "
    "val-best = best is the best epoch on the validation split (the number the paper "
    "reports), final the last epoch on it; val-last = both the last epoch; holdout = "
    "best is the validation split measured once with the head and epoch chosen on a holdout of "
    "the training split, final the last epoch on that holdout (training images); a grid's "
    "`<head> head_lr<value>` rows: that head's best and final on its run's epochs' split; "
    "holdout-only = an incomplete holdout run: both on the holdout. "
    "Depth: d1 %; segmentation: mIoU %; k-NN: top-1 %; linear probe: top-1 % of the reported "
    "head (head = the feature; its lr grid's heads in the rows under it).\n"
    "sizes = crop/window/stride (k-NN: resize/crop) used; reference 256/256/170 (k-NN 256/256); "
    "a baseline of another patch size uses the largest multiple of its patch up to 256 "
    "(patch 14: 252/252/168); - = not recorded."
)


def encoder_label(source: str, name: str) -> str:
    """The plain name for Pixio; `source:name` for a baseline encoder."""
    return name if source == PIXIO else f"{source}:{name}"


def checkpoint_cell(sha256: str | None, checkpoint: str | None, random: bool) -> str:
    """`encoder.safetensors@1a2b3c4d`: the checkpoint's file name and short digest (one word);
    `random` for random weights, `-` for what a run did not record."""
    if random:
        return "random"
    if not (sha256 or checkpoint):
        return "-"
    name = Path(checkpoint).name if checkpoint else ""
    return f"{name}@{sha256[:DIGEST_CHARS]}" if sha256 else name


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
    random: bool = False  # random weights (a demo without a checkpoint)
    demo: bool = False  # a demo experiment's generated data
    sha256: str | None = None  # the checkpoint's digest (None: random or not recorded)
    checkpoint: str | None = None  # the checkpoint's path as recorded
    grid: bool = False  # one head of an lr grid (not in the side-by-side table)
    rule: str = "reference"  # eval.select of a depth / segmentation run ("" for k-NN)

    @property
    def label(self) -> str:
        return encoder_label(self.source, self.encoder)

    @property
    def column(self) -> str:
        """The side-by-side column: the encoder label and its checkpoint's short digest."""
        return f"{self.label}@{self.sha256[:DIGEST_CHARS]}" if self.sha256 else self.label

    @property
    def comparable(self) -> bool:
        """A trained encoder on real data: may stand beside the published numbers."""
        return not (self.random or self.demo)

    @property
    def headline(self) -> bool:
        """A run's own number, for the side-by-side table (not one head of an lr grid)."""
        return self.comparable and not self.grid

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.task, self.dataset, self.head)

    def cells(self) -> list[str]:
        epoch = "" if self.best_epoch is None else f" ({self.best_epoch:g})"
        marks = [m for m in (self.status, RANDOM_MARK if self.random else "") if m]
        published = _published(self.dataset, self.head) if self.comparable else ["-", "-"]
        dataset = f"{DEMO_PREFIX}{self.dataset}" if self.demo else self.dataset
        checkpoint = checkpoint_cell(self.sha256, self.checkpoint, self.random)
        rule = RULE_CELLS.get(self.rule, "-") if self.rule else "-"
        return [self.task, dataset, self.head, self.label, checkpoint, self.metric, self.sizes,
                f"{_num(self.best)}{epoch}", _num(self.final), *published, rule,
                " ".join([self.run, *marks])]  # fmt: skip


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


def _encoder_fields(enc: dict[str, Any]) -> dict[str, Any]:
    """Row fields of an encoder record (results.json's, or a config's `encoder`)."""
    return {"source": enc.get("source") or PIXIO, "sha256": enc.get("sha256"),
            "checkpoint": enc.get("checkpoint"), "random": bool(enc.get("random_weights"))}  # fmt: skip


def head_rows(results: dict[str, Any], run: str) -> list[Row]:
    """The row of a depth / segmentation results.json (its rule: `select.rule`, `reference` for
    files from before the key), then, for a grid of several lrs, one row per head."""
    metric, head = results["metric"], results["head"]
    best, final, enc = results["best"], results["final"], encoder_of(results)
    common = dict(run=run, sizes=_sizes(results.get("protocol"), ("crop_size", "window", "stride")),
                  demo=bool(results.get("demo")), rule=(results.get("select") or {}).get("rule", "reference"),
                  **_encoder_fields(enc))  # fmt: skip
    shown = metric if "head" not in best else f"{metric} ({best['head']})"
    rows = [Row(results["task"], results["dataset"], head, enc["name"], shown, best[metric],
                best.get("epoch"), final[metric], **common)]  # fmt: skip
    grid = results.get("grid") or {}
    for name, entry in grid.items() if len(grid) > 1 else ():
        b, f = entry["best"], entry["final"]
        rows.append(Row(results["task"], results["dataset"], f"{head} {name}", enc["name"], metric,
                        b[metric], b.get("epoch"), f[metric], grid=True, **common))  # fmt: skip
    return rows


def knn_rows(results: dict[str, Any], run: str) -> list[Row]:
    """One row per k of a k-NN results.json (top-1 as best and final; top-5 in the metric)."""
    enc = encoder_of(results)  # also the encoder of a file of an earlier version
    sizes = _sizes(results.get("protocol"), ("resize", "crop"))
    rows = []
    for k, top1 in sorted(results["top1"].items(), key=lambda kv: int(kv[0])):
        metric = f"top1 (top5 {_num(results.get('top5', {}).get(k))})"
        rows.append(Row("knn", results.get("dataset") or "imagenet", f"k={k}", enc["name"],
                        metric, top1, None, top1, run, sizes=sizes, rule="",
                        demo=bool(results.get("demo")), **_encoder_fields(enc)))  # fmt: skip
    return rows


def linear_rows(results: dict[str, Any], run: str) -> list[Row]:
    """A linear probe's row (the reported head's best and final top-1, top-5 and the head in the
    metric), then, for a grid of several lrs, one row per head (`<feature> head_lr<value>`)."""
    enc, feature = encoder_of(results), results["head"]
    common = dict(run=run, sizes=_sizes(results.get("protocol"), ("resize", "crop")),
                  demo=bool(results.get("demo")), **_encoder_fields(enc))  # fmt: skip
    best, final = results["best"], results["final"]
    metric = f"top1 (top5 {_num(best.get('top5'))}, {results.get('reported_head', '-')})"
    rows = [Row(LINEAR_TASK, results["dataset"], feature, enc["name"], metric, best["top1"],
                best.get("epoch"), final.get("top1"), **common)]  # fmt: skip
    grid = results.get("grid") or {}
    for name, head in grid.items() if len(grid) > 1 else ():
        b = head["best"]
        rows.append(Row(LINEAR_TASK, results["dataset"], f"{feature} {name}", enc["name"],
                        f"top1 (top5 {_num(b.get('top5'))})", b["top1"], b.get("epoch"),
                        head["final"].get("top1"), grid=True, **common))  # fmt: skip
    return rows


def incomplete_rows(record: dict[str, Any], run_dir: Path, run: str) -> list[Row]:
    """A run without results.json: its checked val_results.json, with task / dataset / head /
    encoder from its config.yaml when there is one."""
    config = _read_yaml(run_dir / "config.yaml")
    dataset = (config.get("dataset") or {}).get("name", "?")
    head = (config.get("head") or {}).get("name", "?")
    task = TASK_OF.get(dataset, "?")
    if "linear" in config:  # a linear probe: ImageNet, the head is its feature
        task, dataset, head = LINEAR_TASK, "imagenet", config["linear"].get("feature", "?")
    encoder, data = config.get("encoder") or {}, config.get("data") or {}
    demo = bool(data.get("demo", data.get("build_demo")))  # data.demo: the apps record it
    metric, best, last = record["metric"], record["best"], record.get("last") or {}
    select = (config.get("eval") or {}).get("select", "reference")  # its validations' split
    rule = "holdout-running" if select == "holdout" else select
    return [Row(task, dataset, head, encoder.get("name", "?"), metric,
                best[metric], best.get("epoch"), last.get(metric), run, "incomplete",
                demo=demo, rule=rule, **{**_encoder_fields(encoder), "random": is_random(encoder)})]  # fmt: skip


def _read_yaml(path: Path) -> dict[str, Any]:
    """A run's config.yaml ({} when there is none); ResultsFileError naming it when unreadable."""
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # OSError, YAML syntax, OmegaConf's own errors
        raise ResultsFileError(f"{path}: cannot be read ({' '.join(str(err).split())})") from None  # fmt: skip
    if not isinstance(config, dict):
        raise ResultsFileError(f"{path}: not a config (a YAML mapping)")
    return config


def collect(root: str | Path) -> tuple[list[Row], list[str]]:
    """Rows of every run below `root`, sorted by task, dataset, head; and one line per file
    skipped (unreadable, cut short, or lacking a finished run's values). A folder whose
    results.json is skipped is shown from its val_results.json, when that one reads."""
    root = Path(root)
    rows: list[Row] = []
    skipped: list[str] = []
    done = set()
    for path in sorted(root.rglob(RESULTS_FILE)):
        run = str(path.parent.relative_to(root)) or "."
        try:
            results = read_results(path)
        except ResultsFileError as err:
            skipped.append(f"skipped {err}")
            continue
        rows += _rows_of(results)(results, run)
        done.add(path.parent)
    for path in sorted(root.rglob(VAL_RESULTS_FILE)):
        if path.parent not in done:
            run = str(path.parent.relative_to(root)) or "."
            try:
                rows += incomplete_rows(read_val_results(path), path.parent, run)
            except ResultsFileError as err:
                skipped.append(f"skipped {err}")
    rows.sort(key=lambda r: (TASK_ORDER.get(r.task, 3), r.dataset, _head_order(r.head), r.run))
    return rows, skipped


def _rows_of(results: dict[str, Any]) -> Any:
    if results.get("task") == LINEAR_TASK:
        return linear_rows
    return knn_rows if is_knn(results) else head_rows


def _head_order(head: str) -> tuple[int, str]:
    """Heads by name; k-NN's `k=N` by N (k=5 before k=10)."""
    return (int(head[2:]), "") if head.startswith("k=") and head[2:].isdigit() else (0, head)


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
    """The side-by-side columns of the runs, one per checkpoint (`Row.column`): Pixio's first,
    then the baselines, each group sorted."""
    source = {r.column: r.source for r in rows}
    return sorted(source, key=lambda column: (source[column] != PIXIO, column))


def _score(row: Row) -> float:
    # NaN (a diverged run) must not win the max over an encoder's runs
    return -math.inf if math.isnan(row.best) else row.best


def best_cell(runs: list[Row]) -> str:
    """One encoder's headline in one cell: its best run, `+` when it had several, `*` when the
    shown run is incomplete, `-` when it had none."""
    if not runs:
        return "-"
    top = max(runs, key=_score)
    marks = f"{RULE_MARKS.get(top.rule, '')}{'*' if top.status else ''}{'+' if len(runs) > 1 else ''}"  # fmt: skip
    return f"{_num(top.best)}{marks}"


def format_comparison(rows: list[Row]) -> str:
    """One line per task / dataset / head (k-NN: per k), one column per checkpoint, then the
    paper's numbers; lines in the order of `rows` (as `collect` sorts them). Runs of random
    weights or on demo data are left out."""
    rows = [r for r in rows if r.headline]
    if not rows:
        return NO_COMPARISON
    labels = encoder_columns(rows)
    cells = list(dict.fromkeys(r.cell for r in rows))  # first-seen order keeps collect's sort
    body = []
    for task, dataset, head in cells:
        here = [r for r in rows if r.cell == (task, dataset, head)]
        values = [best_cell([r for r in here if r.column == label]) for label in labels]
        body.append([task, dataset, head, *values, *_published(dataset, head)])
    return _align(["task", "dataset", "head", *labels, *PAPER_COLUMNS], body)


def table_report(results: dict[str, Any], run: str) -> str | None:
    """The per-class (segmentation) or per-depth-bin (depth) table of a run's reported result,
    titled with what it is (head, epoch, split, rule); None when the run recorded none."""
    table = results.get("per_class") or results.get("per_depth_bin")
    if not isinstance(table, dict) or not table.get("rows"):
        return None
    enc = encoder_of(results)
    rule = RULE_CELLS.get((results.get("select") or {}).get("rule", "reference"), "-")
    title = (f"{results['task']} {results['dataset']} {results['head']} of "
             f"{encoder_label(enc.get('source', PIXIO), enc['name'])} ({run}): head "
             f"{table.get('head')}, epoch {table.get('epoch')}, {table.get('split')} split, rule {rule}")  # fmt: skip
    if "per_class" in results:
        header = ["class", "name", "IoU %", "acc %", "pixels"]
        body = [[str(r["class"]), r.get("name", "-"), _num(r["iou"]), _num(r["acc"]), str(r["pixels"])] for r in table["rows"]]  # fmt: skip
    else:
        header = ["gt depth (m)", "pixels", "d1 %", "abs_rel"]
        body = [[f"{r['from']:g}-{r['to']:g}", str(r["pixels"]), _num(r["d1"]), _num(r["abs_rel"])] for r in table["rows"]]  # fmt: skip
    return f"{title}\n{_align(header, body)}"


def tables_under(root: str | Path) -> list[str]:
    """`table_report` of every readable results.json below `root`, in path order."""
    out = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        try:
            results = read_results(path)
        except ResultsFileError:
            continue  # named once already, by collect
        if results.get("task") in TASK_ORDER and (text := table_report(results, str(path.parent.relative_to(root)) or ".")):  # fmt: skip
            out.append(text)
    return out


def missing(rows: list[Row]) -> list[str]:
    """The dataset x head cells of the published table that no run covers."""
    found = {(r.dataset, r.head) for r in rows}
    return [f"{d}/{h}" for d, h in PUBLISHED if (d, h) not in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_root", help="folder holding the runs (searched recursively)")
    parser.add_argument("--per-class", action="store_true", help="also print each run's per-class (segmentation) or per-depth-bin (depth) table")  # fmt: skip
    args = parser.parse_args(argv)
    if not Path(args.output_root).is_dir():
        print(f"error: {args.output_root} is not a directory", file=sys.stderr)
        return 1
    rows, skipped = collect(args.output_root)
    for line in skipped:
        print(line, file=sys.stderr)
    if not rows:
        found = f"{len(skipped)} unreadable file(s), listed above" if skipped else "no results.json or val_results.json"  # fmt: skip
        print(f"error: nothing to report under {args.output_root}: {found}", file=sys.stderr)
        return 1
    print(COMPARISON_TITLE, format_comparison(rows), COMPARISON_NOTE, "", sep="\n")
    print("every run", format_table(rows), RUNS_NOTE, sep="\n")
    if any(r.demo for r in rows):
        print(DEMO_NOTE)
    if any(r.random for r in rows):
        print(RANDOM_NOTE)
    if gaps := missing([r for r in rows if r.headline]):
        print(f"no run for: {', '.join(gaps)}")
    if args.per_class:
        for text in tables_under(args.output_root):
            print("", text, sep="\n")
    if skipped:
        print(f"skipped {len(skipped)} file(s) that could not be read (named on stderr)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
