"""Skip counts shared by the main process and its DataLoader workers, and per-shard log lines."""

from __future__ import annotations

import logging
from collections import Counter

import torch

log = logging.getLogger("pixio.data")

# Problems with the input (logged per shard) first, then the filter drops (counted, not logged).
PROBLEM_REASONS: tuple[str, ...] = (
    "corrupt_image",
    "not_an_image",
    "bad_tar",
    "missing_json",
    "bad_json",
    "missing_json_entry",
    "missing_field",
)
FILTER_REASONS: tuple[str, ...] = ("hist_filter", "res_filter", "soft_sampling")
REASONS: tuple[str, ...] = PROBLEM_REASONS + FILTER_REASONS

# Row 0 is the main process, row 1 + w is DataLoader worker w. Workers beyond the table share
# rows (folded), which only risks a lost increment, never a crash.
MAX_WORKER_ROWS = 512


class SkipCounter:
    """An int64 (rows x reasons) table in shared memory, created before the workers fork.

    Each process writes only its own row, so no lock is needed; `totals` sums the rows.
    """

    def __init__(self) -> None:
        self.table = torch.zeros(1 + MAX_WORKER_ROWS, len(REASONS), dtype=torch.int64)
        self.table.share_memory_()
        self._col = {reason: i for i, reason in enumerate(REASONS)}

    @staticmethod
    def own_row() -> int:
        """This process's row: 0 outside DataLoader workers, 1 + worker id inside one."""
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % MAX_WORKER_ROWS

    def add(self, reason: str, n: int = 1) -> None:
        """Count `n` skips under `reason` in this process's row."""
        self.table[self.own_row(), self._col[reason]] += n

    def totals(self) -> dict[str, int]:
        """Totals by reason over the main process and all workers (every reason listed)."""
        sums = self.table.sum(dim=0).tolist()
        return {reason: int(sums[i]) for i, reason in enumerate(REASONS)}

    def reset(self) -> None:
        """Zero every row (for example between benchmark runs)."""
        self.table.zero_()


class ShardReport:
    """Problems met while one shard is read: counted at once, logged in one line at the end."""

    def __init__(self, shard: str, counter: SkipCounter | None) -> None:
        self.shard = shard
        self.counter = counter
        self.counts: Counter[str] = Counter()
        self.details: list[str] = []

    def add(self, reason: str, n: int = 1, detail: str | None = None) -> None:
        """Count a skip now (so an abandoned iterator loses nothing) and remember it for the log."""
        if reason not in REASONS:
            raise KeyError(f"unknown skip reason {reason!r}; valid: {', '.join(REASONS)}")
        self.counts[reason] += n
        if detail and len(self.details) < 3:
            self.details.append(detail)
        if self.counter is not None:
            self.counter.add(reason, n)

    def has(self, reason: str) -> bool:
        """Whether `reason` was counted for this shard read."""
        return self.counts[reason] > 0

    def problems(self) -> dict[str, int]:
        """Input problems of this read (filter drops left out), in table order."""
        return {r: self.counts[r] for r in PROBLEM_REASONS if self.counts[r]}

    def line(self) -> str | None:
        """`shard PATH: 1 corrupt_image, 2 not_an_image`, or None when the shard had no problem."""
        problems = self.problems()
        if not problems:
            return None
        text = ", ".join(f"{n} {reason}" for reason, n in problems.items())
        if self.details:
            text += f" ({'; '.join(self.details)})"
        return f"shard {self.shard}: {text}"

    def close(self) -> None:
        """Log the shard's line on `pixio.data` if it had any problem."""
        line = self.line()
        if line is not None:
            log.warning(line)
