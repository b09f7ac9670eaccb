"""Curation statistics for web shards: the JSON files the stream's filters read.

    python -m pixio.data.curate --shards ROOT --out JSON_ROOT \
        [--mae-checkpoint PATH --model pixio_vith16 [--model-kwargs '{"depth": 24}']] \
        [--workers N] [--batch-size 32] [--device cuda] [--overwrite]

For every `**/*.tar` under ROOT writes `JSON_ROOT/<parent dir>/<name>.json` mapping each image
member to `height`, `width`, `histogram_score` (and `mae_loss`, `mae_loss_raw` with a
checkpoint), then `curation_summary.json` and `curation_summary.png`. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.data.counters import ShardReport
from pixio.data.images import DecodeError, load_rgb, to_rgb
from pixio.data.shards import find_shards, load_stats, read_members, stats_path

log = logging.getLogger("pixio.data")

IMAGE_MEMBER = re.compile(r"^(?:.*/)?[^./]+\.(jpe?g)$", re.IGNORECASE)  # webdataset's key split
MASK_RATIO = 0.75
REFERENCE_HIST_THRESH = 4.5  # the 5B web recipe (docs/reproduction.md)
REFERENCE_IMGRES_THRESH = 320
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def histogram_score(img: Image.Image) -> float:
    """Mean over R, G, B of the Shannon entropy (bits) of the channel's 256-bin histogram."""
    counts = np.asarray(to_rgb(img).histogram(), dtype=np.float64).reshape(3, 256)
    probs = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    logs = np.log2(np.where(probs > 0, probs, 1.0))
    return float(-(probs * logs).sum(axis=1).mean())


def mae_keep_probability(loss: float) -> float:
    """p = clip(loss, 0, 1); a non-finite loss maps to 1 (kept)."""
    return 1.0 if not math.isfinite(loss) else min(max(loss, 0.0), 1.0)


@dataclass(frozen=True)
class ModelSpec:
    """What each process needs to build the scorer."""

    checkpoint: str
    model: str
    model_kwargs: dict[str, Any]
    device: str


class MAEScorer:
    """Masked-reconstruction loss of a Pixio MAE with a group mask fixed by the member name."""

    def __init__(self, mae: torch.nn.Module, device: str = "cpu") -> None:
        self.mae = mae.to(device).eval()
        self.device = device
        gh, gw = mae.grid_size
        self.size = (gh * mae.patch_size, gw * mae.patch_size)
        from pixio.models.masking import num_groups

        self.num_groups = num_groups(gh, gw, mae.mask_grid)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @classmethod
    def load(cls, spec: ModelSpec) -> MAEScorer:
        """Build `spec.model` (norm_pix_loss=True) and load a full MAE checkpoint strictly."""
        from pixio import build_mae, read_state_dict

        mae = build_mae(spec.model, **{**spec.model_kwargs, "norm_pix_loss": True})
        state = read_state_dict(spec.checkpoint)
        missing = sorted(set(mae.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(mae.state_dict()))
        if missing or unexpected:
            raise KeyError(
                f"{spec.checkpoint} is not a full MAE matching {spec.model} {spec.model_kwargs}: "
                f"missing {missing[:10]}, unexpected {unexpected[:10]}"
            )
        mae.load_state_dict(state, strict=True)
        return cls(mae, spec.device)

    def prepare(self, img: Image.Image) -> torch.Tensor:
        """Shorter side resized to the input size (bicubic), centre crop, normalised (3, H, W)."""
        height, width = self.size
        factor = max(height / img.height, width / img.width)
        new_w, new_h = (
            max(width, round(img.width * factor)),
            max(height, round(img.height * factor)),
        )
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        img = img.crop((left, top, left + width, top + height))
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std

    def noise(self, name: str) -> torch.Tensor:
        """(num_groups,) mask noise seeded by the CRC32 of the member name."""
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
        return torch.rand(self.num_groups, generator=gen)

    @torch.inference_mode()
    def score(self, images: Sequence[torch.Tensor], names: Sequence[str]) -> list[float]:
        """Raw per-sample losses of one batch."""
        imgs = torch.stack(list(images)).to(self.device)
        noise = torch.stack([self.noise(n) for n in names]).to(self.device)
        out = self.mae(imgs, mask_ratio=MASK_RATIO, noise=noise)
        return [float(v) for v in out.loss_per_sample.float().cpu()]


@dataclass
class ShardResult:
    """What one curated shard reports back to the parent process."""

    shard: str
    images: int = 0
    problems: dict[str, int] = field(default_factory=dict)


def image_stats(data: bytes) -> tuple[dict[str, Any], Image.Image]:
    """height, width (stored size) and histogram_score of image bytes, and the RGB image."""
    img = load_rgb(data)
    return {"height": img.height, "width": img.width, "histogram_score": histogram_score(img)}, img


def _score_batch(scorer: MAEScorer, batch: list[tuple[str, torch.Tensor]], stats: dict) -> None:
    """Add mae_loss / mae_loss_raw for a batch of (member, prepared image)."""
    losses = scorer.score([x for _, x in batch], [name for name, _ in batch])
    for (name, _), loss in zip(batch, losses, strict=True):
        stats[name]["mae_loss"] = mae_keep_probability(loss)
        stats[name]["mae_loss_raw"] = loss if math.isfinite(loss) else None
    batch.clear()


def shard_stats(
    shard: Path, report: ShardReport, scorer: MAEScorer | None = None, batch_size: int = 32
) -> dict[str, dict[str, Any]]:
    """Statistics of every decodable image member of one shard (problems counted on report)."""
    stats: dict[str, dict[str, Any]] = {}
    batch: list[tuple[str, torch.Tensor]] = []
    for member in read_members(shard, report):
        name = member["fname"]
        if not IMAGE_MEMBER.match(name):
            continue
        try:
            stats[name], img = image_stats(member["data"])
        except DecodeError as err:
            report.add(err.reason, detail=f"{name}: {err.detail[:80]}")
            continue
        if scorer is not None:
            batch.append((name, scorer.prepare(img)))
            if len(batch) >= batch_size:
                _score_batch(scorer, batch, stats)
    if scorer is not None and batch:
        _score_batch(scorer, batch, stats)
    return stats


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name, then rename (a crash never leaves a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)


def curate_shard(
    shard: Path, out: Path, scorer: MAEScorer | None = None, batch_size: int = 32
) -> ShardResult:
    """Compute and write one shard's statistics file."""
    report = ShardReport(str(shard), None)
    stats = shard_stats(shard, report, scorer, batch_size)
    write_json_atomic(out, stats)
    report.close()
    return ShardResult(str(shard), len(stats), report.problems())


# ---- multi-process driver --------------------------------------------------------------------
_WORKER_SCORER: MAEScorer | None = None


def _init_worker(spec: ModelSpec | None, threads: int) -> None:
    """Load the model once per process."""
    global _WORKER_SCORER
    torch.set_num_threads(threads)
    _WORKER_SCORER = MAEScorer.load(spec) if spec is not None else None


def _work(job: tuple[Path, Path, int]) -> ShardResult:
    shard, out, batch_size = job
    return curate_shard(shard, out, _WORKER_SCORER, batch_size)


def output_paths(shards: list[Path], out_root: Path) -> dict[Path, Path]:
    """shard -> JSON path; ValueError when two shards map to the same file."""
    outputs: dict[Path, Path] = {}
    seen: dict[Path, Path] = {}
    for shard in shards:
        target = stats_path(shard, out_root)
        if target in seen:
            raise ValueError(f"{seen[target]} and {shard} would both write {target}")
        seen[target] = outputs[shard] = target
    return outputs


def output_problem(path: Path) -> str | None:
    """Why an existing statistics file cannot be trusted (None when it is usable)."""
    stats, problem = load_stats(path)
    if stats is None:
        return "not a readable UTF-8 JSON object" if problem == "bad_json" else problem
    needed = ("height", "width", "histogram_score")  # what collect_scores reads
    for name, entry in stats.items():
        if not isinstance(entry, dict) or any(not _number(entry.get(k)) for k in needed):
            return f"entry {name!r} lacks height / width / histogram_score"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shards_to_curate(shards: list[Path], outputs: dict[Path, Path], overwrite: bool) -> list[Path]:
    """Shards without a usable statistics file (all with `overwrite`); a corrupt existing file is
    named in a log line and recomputed."""
    todo = []
    for shard in shards:
        out = outputs[shard]
        if overwrite or not out.exists():
            todo.append(shard)
        elif (problem := output_problem(out)) is not None:
            log.warning("re-curating %s: existing statistics file %s is corrupt (%s)", shard, out, problem)  # fmt: skip
            todo.append(shard)
    return todo


def run_jobs(
    jobs: list[tuple[Path, Path, int]], spec: ModelSpec | None, workers: int
) -> Iterator[ShardResult]:
    """Curate shards in `workers` processes (in this one for 1), yielding results as they end."""
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    if workers <= 1 or len(jobs) <= 1:
        _init_worker(spec, torch.get_num_threads())
        yield from map(_work, jobs)
        return
    # CUDA cannot be used in a forked child; on CPU fork avoids re-importing torch per process.
    method = "spawn" if spec is not None and spec.device.startswith("cuda") else "fork"
    if method not in mp.get_all_start_methods():
        method = "spawn"
    context = mp.get_context(method)
    with ProcessPoolExecutor(
        workers, context, initializer=_init_worker, initargs=(spec, threads)
    ) as pool:
        yield from pool.map(_work, jobs)


# ---- summary ---------------------------------------------------------------------------------
def collect_scores(json_files: list[Path]) -> dict[str, np.ndarray]:
    """All per-image scores found in the statistics files."""
    columns: dict[str, list[float]] = {"histogram_score": [], "min_side": [], "mae_loss": []}
    for path in json_files:
        for entry in json.loads(path.read_text(encoding="utf-8")).values():
            columns["histogram_score"].append(entry["histogram_score"])
            columns["min_side"].append(min(entry["height"], entry["width"]))
            if "mae_loss" in entry:
                columns["mae_loss"].append(entry["mae_loss"])
    return {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}


def summarise(scores: dict[str, np.ndarray], problems: dict[str, int]) -> dict[str, Any]:
    """Quantiles, kept fractions at the reference thresholds, problems."""
    n = len(scores["histogram_score"])
    hist_ok = scores["histogram_score"] > REFERENCE_HIST_THRESH
    res_ok = scores["min_side"] >= REFERENCE_IMGRES_THRESH
    kept = {
        f"histogram_score > {REFERENCE_HIST_THRESH}": float(hist_ok.mean()) if n else None,
        f"min side >= {REFERENCE_IMGRES_THRESH}": float(res_ok.mean()) if n else None,
        "both": float((hist_ok & res_ok).mean()) if n else None,
    }
    if len(scores["mae_loss"]) == n and n:
        kept["soft_sampling (expected)"] = float(scores["mae_loss"].mean())
        kept["all three (expected)"] = float((scores["mae_loss"] * (hist_ok & res_ok)).mean())
    quantiles = {
        name: {str(q): float(np.quantile(values, q)) for q in QUANTILES}
        for name, values in scores.items()
        if len(values)
    }
    return {"images": n, "quantiles": quantiles, "kept_fraction": kept, "problems": problems}


def plot_summary(scores: dict[str, np.ndarray], path: Path) -> None:
    """One histogram per score with the reference thresholds (matplotlib, Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k for k, v in scores.items() if len(v)]
    fig = Figure(figsize=(4.5 * max(len(names), 1), 3.5))
    FigureCanvasAgg(fig)
    lines = {"histogram_score": REFERENCE_HIST_THRESH, "min_side": REFERENCE_IMGRES_THRESH}
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.hist(scores[name], bins=50, color="tab:blue")
        if name in lines:
            ax.axvline(lines[name], color="tab:red", linestyle="--", label=f"{lines[name]}")
            ax.legend()
        ax.set_xlabel(name)
        ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- command line ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Curation statistics for web shards.")
    parser.add_argument("--shards", required=True, type=Path, help="root of the **/*.tar shards")
    parser.add_argument("--out", required=True, type=Path, help="JSON_ROOT for the statistics")
    parser.add_argument("--mae-checkpoint", type=Path, help="full MAE checkpoint for mae_loss")
    parser.add_argument("--model", help="model name of the checkpoint, e.g. pixio_vith16")
    parser.add_argument("--model-kwargs", default="{}", help="JSON overrides for build_mae")
    parser.add_argument("--workers", type=int, default=1, help="processes over shards")
    parser.add_argument("--batch-size", type=int, default=32, help="MAE scoring batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing JSON files")
    args = parser.parse_args(argv)
    if (args.mae_checkpoint is None) != (args.model is None):
        parser.error("--mae-checkpoint and --model go together")
    if args.workers < 1 or args.batch_size < 1:
        parser.error("--workers and --batch-size must be >= 1")
    return args


def curate(args: argparse.Namespace) -> dict[str, Any]:
    """Curate every shard not yet done, then write the summary JSON and PNG; returns the summary."""
    shards = find_shards(args.shards, "web")
    outputs = output_paths(shards, args.out)
    todo = shards_to_curate(shards, outputs, args.overwrite)
    log.info(
        "%d shards, %d to curate, %d already done", len(shards), len(todo), len(shards) - len(todo)
    )
    spec = None
    if args.mae_checkpoint is not None:
        kwargs = json.loads(args.model_kwargs)
        spec = ModelSpec(str(args.mae_checkpoint), args.model, kwargs, args.device)
    jobs = [(s, outputs[s], args.batch_size) for s in todo]
    problems: Counter[str] = Counter()
    from tqdm import tqdm

    for result in tqdm(run_jobs(jobs, spec, args.workers), total=len(jobs), unit="shard"):
        problems.update(result.problems)
    scores = collect_scores([outputs[s] for s in shards])
    summary = summarise(scores, dict(problems))
    summary.update(
        shards=len(shards), shards_curated=len(todo), shards_existing=len(shards) - len(todo)
    )
    write_json_atomic(args.out / "curation_summary.json", summary)
    plot_summary(scores, args.out / "curation_summary.png")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pixio.data.curate ...`"""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    summary = curate(args)
    log.info(
        "wrote %s: %s", args.out / "curation_summary.json", json.dumps(summary["kept_fraction"])
    )


if __name__ == "__main__":
    main()
