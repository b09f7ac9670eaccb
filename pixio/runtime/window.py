"""What the trainer keeps between two log lines without reading the device: the sums of each
iteration's scalars (loss and the task's metrics) and the first non-finite loss since the last
check. Both stay device tensors; the host reads them only when it logs or checks (one read for
all the values), so a training iteration never waits for the device on other iterations. Also
what a log line adds: the merge over ranks, skipped samples, TFLOP/s and MFU.

Cost per iteration: about ten kernels on 0-dim tensors (the stack of the scalars, their sum, the
finite check); each read is one device-to-host copy of a few dozen bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from pixio.models.flops import utilization
from pixio.runtime.distributed import is_dist, reduce_device
from pixio.runtime.task import StepOutput


def step_scalars(out: StepOutput) -> dict[str, torch.Tensor]:
    """`loss` and the task's metrics of one micro-batch as 0-dim float64 device tensors
    (detached), from one stack: a few kernels whatever their number."""
    names = ["loss", *sorted(out.metrics)]
    values = [out.loss, *(out.metrics[k] for k in names[1:])]
    stacked = torch.stack([v.detach().float() for v in values]).double()  # (K,)
    return dict(zip(names, stacked.unbind(), strict=True))


def read(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """`values` as Python floats: device tensors read in one device-to-host copy."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return {k: float(v) for k, v in values.items()}
    read_back = torch.stack([v.detach().double() for v in tensors.values()]).tolist()
    out = dict(zip(tensors, read_back, strict=True))
    return {k: out[k] if k in out else float(v) for k, v in values.items()}


class Window:
    """Sums of the step scalars since the last log line, on the device (logged as their means).
    Iterations may report different metric names; each name's mean is over the iterations that
    reported it."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}  # names -> (K,) float64 sums
        self._counts: dict[tuple[str, ...], int] = {}

    @property
    def count(self) -> int:
        """Iterations added since the window started."""
        return sum(self._counts.values())

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        names = tuple(values)
        stacked = torch.stack([v.detach().double() for v in values.values()])  # (K,)
        if names in self._sums:
            self._sums[names] += stacked
        else:
            self._sums[names] = stacked
        self._counts[names] = self._counts.get(names, 0) + 1

    def means(self) -> dict[str, torch.Tensor]:
        """Per name, the mean over the iterations that reported it (device tensors)."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for names, total in self._sums.items():
            for name, value in zip(names, total.unbind(), strict=True):
                sums[name] = sums[name] + value if name in sums else value
                counts[name] = counts.get(name, 0) + self._counts[names]
        return {name: value / counts[name] for name, value in sums.items()}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without overwriting the last checkpoint."""


class FiniteWatch:
    """The first iteration whose loss was not finite since the last clean check, on the device.
    The trainer reads it at every log and before every save, validation, picture and periodic
    evaluation, so a NaN never reaches a checkpoint and is reported with its iteration."""

    def __init__(self) -> None:
        self.checked = 0  # iterations done at the last check that found every loss finite
        self._first: torch.Tensor | None = None  # () float64: the iteration, inf while none
        self._value: torch.Tensor | None = None  # () float32: its loss

    def add(self, it: int, loss: torch.Tensor) -> None:
        """Record the loss of iteration `it` (a few kernels, no host read)."""
        loss = loss.detach().float()
        if self._first is None or self._value is None:
            self._first = torch.full((), math.inf, dtype=torch.float64, device=loss.device)
            self._value = torch.zeros((), device=loss.device)
        new = torch.isinf(self._first) & ~torch.isfinite(loss)
        self._first = torch.where(new, it, self._first)
        self._value = torch.where(new, loss, self._value)

    def check(self, done: int, output_dir: Any) -> None:
        """Raise NonFiniteLossError when a rank's loss was not finite since the last check
        (collective; one device read), again at every later check: a non-finite loss is never
        forgotten. Otherwise the first `done` iterations are checked and the watch starts
        afresh. The trainer calls it at every iteration that reads the device anyway and
        before every save."""
        found = first_non_finite(self.read())
        if found is not None:
            it, value = found
            raise NonFiniteLossError(
                f"loss is {value} at iteration {it} (checked iterations {self.checked} to "
                f"{done - 1}): stopping. The last good checkpoint in {output_dir} is untouched; "
                "lower the lr or check the data."
            )
        self.checked = done
        self._first = self._value = None

    def read(self) -> tuple[int, float] | None:
        """(iteration, loss) of the first non-finite loss since the last clean check, or None
        (this rank's; one device-to-host read)."""
        if self._first is None or self._value is None:
            return None
        first, value = torch.stack([self._first, self._value.double()]).tolist()
        return None if math.isinf(first) else (int(first), value)


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (small, picklable objects only; collective)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_over_ranks(means: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the ranks that report it (collective when distributed). Values
    every rank agrees on (a shared lr, a DDP gradient norm) are kept exactly."""
    if not is_dist():
        return means
    reported: dict[str, list[float]] = {}
    for rank_means in gather(means):
        for key, value in rank_means.items():
            reported.setdefault(key, []).append(value)
    merged = {}
    for key, values in reported.items():
        same = all(v == values[0] for v in values)
        merged[key] = values[0] if same else sum(values) / len(values)
    return merged


def first_non_finite(found: tuple[int, float] | None) -> tuple[int, float] | None:
    """The earliest of every rank's `FiniteWatch.read()` (collective when distributed)."""
    reports = [r for r in gather(found) if r is not None]
    return min(reports) if reports else None


def skipped_counts(data: Any) -> dict[str, int]:
    """Samples the data pipeline dropped since this process started, by reason, summed over
    ranks (`skipped/<reason>`; zero counts left out). Collective when distributed."""
    counts = data.skip_counts() if hasattr(data, "skip_counts") else {}
    reasons = sorted(counts)  # every rank's pipeline lists the same reasons
    if not reasons:
        return {}
    totals = torch.tensor([counts[r] for r in reasons], dtype=torch.float64)
    if is_dist():
        totals = totals.to(reduce_device())
        dist.all_reduce(totals)
    return {f"skipped/{r}": int(n) for r, n in zip(reasons, totals.tolist(), strict=True) if n}


def utilization_fields(
    flops_per_sample: float | None,
    images_per_s: float,
    world_size: int,
    device: torch.device,
    peak_tflops: float | None = None,
) -> dict[str, float]:
    """`tflops`: model TFLOP/s per device, FLOPs per sample x the images per second of all
    ranks / the ranks; `mfu`: that / the peak (`peak_tflops`, else the GPU's dense bf16 figure,
    none on CPU). Nothing when the FLOPs are unknown or nothing was timed yet."""
    if flops_per_sample is None or images_per_s <= 0:
        return {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    u = utilization(flops_per_sample * images_per_s, 1.0, world_size, name, peak_tflops)
    return {"tflops": u.tflops} | ({} if u.mfu is None else {"mfu": u.mfu})
