"""The web-data filters (histogram score, resolution, soft sampling) and the missing-JSON policy.

The reference filters (docs/reproduction.md): keep if `histogram_score > hist_thresh`; keep if
both sides `>= imgres_thresh`; soft sampling keeps an image with probability `mae_loss`. They run in that order and a sample is
counted under the first one that drops it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixio.data.counters import ShardReport
from pixio.data.shards import load_stats, stats_path

MISSING_POLICIES: tuple[str, ...] = ("unfiltered", "skip")


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds (None / False = off) and what to do when statistics are missing."""

    hist_thresh: float | None = None
    imgres_thresh: int | None = None
    soft_sampling: bool = False
    missing_json: str = "unfiltered"

    def __post_init__(self) -> None:
        if self.missing_json not in MISSING_POLICIES:
            raise ValueError(
                f"missing_json must be one of {', '.join(MISSING_POLICIES)}, "
                f"got {self.missing_json!r}"
            )

    @property
    def active(self) -> bool:
        """Whether any filter is on (statistics are only read then)."""
        return self.hist_thresh is not None or self.imgres_thresh is not None or self.soft_sampling

    @property
    def fields(self) -> tuple[str, ...]:
        """Statistics the active filters need."""
        needed = ("histogram_score",) if self.hist_thresh is not None else ()
        needed += ("height", "width") if self.imgres_thresh is not None else ()
        return needed + (("mae_loss",) if self.soft_sampling else ())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def member_candidates(key: str, ext: str) -> tuple[str, ...]:
    """Names a member may be listed under: `dir/000123.jpeg`, `000123.jpeg`, `dir/000123`, `000123`."""
    base = key.rsplit("/", 1)[-1]
    return (f"{key}.{ext}", f"{base}.{ext}", key, base)


class ShardFilter:
    """The filters applied to the samples of one shard read; every decision is counted."""

    def __init__(
        self,
        cfg: FilterConfig,
        stats: dict[str, Any] | None,
        report: ShardReport,
        rng: np.random.Generator,
    ) -> None:
        self.cfg = cfg
        self.stats = stats  # None: use every sample unfiltered
        self.report = report
        self.rng = rng
        self._folded: dict[str, Any] | None = None

    def lookup(self, key: str, ext: str) -> Any:
        """The statistics entry of a member (exact name first, then case-insensitive), or None."""
        assert self.stats is not None
        names = member_candidates(key, ext)
        for name in names:
            if name in self.stats:
                return self.stats[name]
        if self._folded is None:  # webdataset lower-cases extensions: `A.JPG` arrives as `A.jpg`
            self._folded = {k.lower(): v for k, v in self.stats.items()}
        return next((self._folded[n.lower()] for n in names if n.lower() in self._folded), None)

    def keep(self, key: str, ext: str) -> bool:
        """Whether to use the sample; drops and missing statistics are counted on the report."""
        if self.stats is None:
            return True
        entry = self.lookup(key, ext)
        policy_keeps = self.cfg.missing_json == "unfiltered"
        if entry is None:
            self.report.add("missing_json_entry")
            return policy_keeps
        if not self.complete(entry):
            self.report.add("missing_field")
            return policy_keeps
        reason = self.drop_reason(entry)
        if reason is not None:
            self.report.add(reason)
        return reason is None

    def complete(self, entry: Any) -> bool:
        """Whether an entry has a finite number for every field the active filters need."""
        return isinstance(entry, dict) and all(_is_number(entry.get(k)) for k in self.cfg.fields)

    def drop_reason(self, entry: dict[str, Any]) -> str | None:
        """The first filter that drops a sample with complete statistics, or None to keep it."""
        cfg = self.cfg
        if cfg.hist_thresh is not None and not entry["histogram_score"] > cfg.hist_thresh:
            return "hist_filter"
        res = cfg.imgres_thresh
        if res is not None and min(entry["height"], entry["width"]) < res:
            return "res_filter"
        if cfg.soft_sampling and not self.rng.random() < entry["mae_loss"]:
            return "soft_sampling"
        return None


def open_shard_filter(
    cfg: FilterConfig,
    shard: str | Path,
    json_root: str | Path | None,
    report: ShardReport,
    rng: np.random.Generator,
) -> ShardFilter | None:
    """The filter for one shard read, or None when the policy skips the whole shard.

    Statistics are only read when a filter is on; a missing or unreadable file is counted
    (`missing_json` / `bad_json`) and then handled by `cfg.missing_json`.
    """
    if not cfg.active:
        return ShardFilter(cfg, None, report, rng)
    assert json_root is not None, "filters need json_root"
    stats, problem = load_stats(stats_path(shard, json_root))
    if problem is not None:
        action = "used unfiltered" if cfg.missing_json == "unfiltered" else "shard skipped"
        report.add(problem, detail=f"{stats_path(shard, json_root)}: {action}")
        if cfg.missing_json == "skip":
            return None
    return ShardFilter(cfg, stats, report, rng)
