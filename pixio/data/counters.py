"""Skip and stream counts shared by the main process and its DataLoader workers, and the
once-per-(shard, reason) problem log."""

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
# What the stream did (not skips): decode calls, images handed out, samples a resume skipped
# without decoding and the encoded bytes it read to do so.
EVENTS: tuple[str, ...] = ("decoded", "delivered", "replayed", "replayed_bytes")

# Row 0 is the main process, row 1 + w is DataLoader worker w. Workers beyond the table share
# rows (folded), which only risks a lost increment, never a crash.
MAX_WORKER_ROWS = 512


class SkipCounter:
    """int64 (rows x reasons) and (rows x events) tables in shared memory, created before the
    workers fork, plus this process's record of the (shard, reason) pairs already logged.

    Each process writes only its own row, so no lock is needed; `totals` sums the rows.
    """

    def __init__(self) -> None:
        self.table = torch.zeros(1 + MAX_WORKER_ROWS, len(REASONS), dtype=torch.int64)
        self.table.share_memory_()
        self.events = torch.zeros(1 + MAX_WORKER_ROWS, len(EVENTS), dtype=torch.int64)
        self.events.share_memory_()
        self._col = {reason: i for i, reason in enumerate(REASONS)}
        self._event_col = {event: i for i, event in enumerate(EVENTS)}
        # Process-local (each forked worker has its own copy): what was logged, whether counting
        # is paused (a resume re-reading samples the previous process already counted).
        self.logged: set[tuple[str, str]] = set()
        self.muted = False

    @staticmethod
    def own_row() -> int:
        """This process's row: 0 outside DataLoader workers, 1 + worker id inside one."""
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else 1 + info.id % MAX_WORKER_ROWS

    def add(self, reason: str, n: int = 1) -> None:
        """Count `n` skips under `reason` in this process's row (nothing while muted)."""
        if not self.muted:
            self.table[self.own_row(), self._col[reason]] += n

    def add_event(self, event: str, n: int = 1) -> None:
        """Count `n` stream events (see EVENTS) in this process's row."""
        self.events[self.own_row(), self._event_col[event]] += n

    def totals(self) -> dict[str, int]:
        """Totals by reason over the main process and all workers (every reason listed)."""
        sums = self.table.sum(dim=0).tolist()
        return {reason: int(sums[i]) for i, reason in enumerate(REASONS)}

    def event_totals(self) -> dict[str, int]:
        """Totals of every stream event over the main process and all workers."""
        sums = self.events.sum(dim=0).tolist()
        return {event: int(sums[i]) for i, event in enumerate(EVENTS)}

    def reset(self) -> None:
        """Zero every row (for example between benchmark runs)."""
        self.table.zero_()
        self.events.zero_()

    def first_time(self, shard: str, reasons: list[str]) -> list[str]:
        """The reasons not yet logged for `shard` in this process; marks them as logged."""
        new = [r for r in reasons if (shard, r) not in self.logged]
        self.logged.update((shard, r) for r in new)
        return new

    def log_problem(self, shard: str, reason: str, detail: str) -> None:
        """Count one problem found after the shard was read (decode) and log it once per
        (shard, reason) per process."""
        self.add(reason)
        if self.first_time(shard, [reason]):
            log.warning("shard %s: %s (%s)", shard, reason, detail)


class ShardReport:
    """Problems met while one shard is read: counted at once, logged in one line at the end,
    leaving out reasons this process has already logged for the shard."""

    def __init__(self, shard: str, counter: SkipCounter | None) -> None:
        self.shard = shard
        self.counter = counter
        self.counts: Counter[str] = Counter()
        self.details: dict[str, str] = {}

    def add(self, reason: str, n: int = 1, detail: str | None = None) -> None:
        """Count a skip now (so an abandoned iterator loses nothing) and remember it for the log."""
        if reason not in REASONS:
            raise KeyError(f"unknown skip reason {reason!r}; valid: {', '.join(REASONS)}")
        self.counts[reason] += n
        if detail and reason not in self.details:
            self.details[reason] = detail
        if self.counter is not None:
            self.counter.add(reason, n)

    def has(self, reason: str) -> bool:
        """Whether `reason` was counted for this shard read."""
        return self.counts[reason] > 0

    def problems(self) -> dict[str, int]:
        """Input problems of this read (filter drops left out), in table order."""
        return {r: self.counts[r] for r in PROBLEM_REASONS if self.counts[r]}

    def line(self, reasons: list[str] | None = None) -> str | None:
        """`shard PATH: 1 corrupt_image, 2 not_an_image (details)` over `reasons` (default: all
        problems), or None when there is nothing to say."""
        problems = self.problems()
        shown = [r for r in problems if reasons is None or r in reasons]
        if not shown:
            return None
        text = ", ".join(f"{problems[r]} {r}" for r in shown)
        details = [self.details[r] for r in shown if r in self.details][:3]
        if details:
            text += f" ({'; '.join(details)})"
        return f"shard {self.shard}: {text}"

    def close(self) -> None:
        """Log the read's problems on `pixio.data`, each (shard, reason) once per process."""
        problems = list(self.problems())
        new = problems if self.counter is None else self.counter.first_time(self.shard, problems)
        line = self.line(new)
        if line is not None:
            log.warning(line)
