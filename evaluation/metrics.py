"""Evaluation metrics and the depth loss (docs/reproduction.md).

Units: every share-type metric is in percent (depth d1/d2/d3, mIoU, pixel accuracy, k-NN top-k),
as the published tables print them; error metrics (abs_rel, rmse, ...) are in their own units
(metres for rmse). Depth metrics are averaged over images (images with fewer than
`MIN_VALID_PIXELS` valid pixels are skipped); segmentation sums intersections and unions over
the whole set before dividing.

Per-sample forms for the trainer's validation (`Task.validate` returns per-sample statistics
that `pixio.runtime.validation.add_real` sums over real samples and ranks, `Task.summarize`
turns the totals into numbers): `depth_metric_sums` + `summarize_depth`, and
`segmentation_stats` + `summarize_segmentation`. Tables of the same totals: per class
(`class_table`: IoU, accuracy and pixels of each class) and per depth bin (`depth_bin_sums` +
`depth_bin_table`: d1 and abs_rel pooled over the valid pixels whose ground truth falls in each
bin, and their count).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

DEPTH_METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
MIN_VALID_PIXELS = 10  # images with fewer valid pixels are skipped (reference protocol)
SILOG_LAMBDA = 0.5


# ---- depth ------------------------------------------------------------------------------------
def depth_valid_mask(
    target: torch.Tensor, min_depth: float = 1e-3, max_depth: float | None = None
) -> torch.Tensor:
    """Pixels with ground truth: finite, > 0 and within [min_depth, max_depth] (inclusive)."""
    valid = torch.isfinite(target) & (target > 0) & (target >= min_depth)
    if max_depth is not None:
        valid &= target <= max_depth
    return valid


def _depth_values(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics over 1-d tensors of valid pixels (float64 scalars)."""
    p, g = pred.double(), target.double()
    ratio = torch.maximum(g / p, p / g)
    diff, diff_log = p - g, torch.log(p) - torch.log(g)
    return {
        "d1": (ratio < 1.25).double().mean() * 100,
        "d2": (ratio < 1.25**2).double().mean() * 100,
        "d3": (ratio < 1.25**3).double().mean() * 100,
        "abs_rel": (diff.abs() / g).mean(),
        "sq_rel": (diff**2 / g).mean(),
        "rmse": (diff**2).mean().sqrt(),
        "rmse_log": (diff_log**2).mean().sqrt(),
        "log10": (torch.log10(p) - torch.log10(g)).abs().mean(),
        "silog": ((diff_log**2).mean() - SILOG_LAMBDA * diff_log.mean() ** 2).clamp_min(0).sqrt(),
    }


def depth_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    min_depth: float = 1e-3,
    max_depth: float | None = None,
) -> dict[str, float] | None:
    """Metrics of one image (pred, target: (H, W) or (1, H, W), metres); None when the image has
    fewer than `MIN_VALID_PIXELS` valid pixels (it is skipped). d1/d2/d3 in percent.

    Predictions are clamped at `min_depth` (as for the loss) so a zero never gives inf."""
    pred, target = pred.squeeze(0), target.squeeze(0)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    valid = depth_valid_mask(target, min_depth, max_depth)
    if int(valid.sum()) < MIN_VALID_PIXELS:
        return None
    values = _depth_values(pred[valid].clamp_min(min_depth), target[valid])
    return {k: float(v) for k, v in values.items()}


def depth_metric_sums(
    pred: torch.Tensor,
    target: torch.Tensor,
    min_depth: float = 1e-3,
    max_depth: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample statistics of a batch (pred, target: (B, H, W) or (B, 1, H, W)) to be summed:
    each metric (0 for a skipped image) and `count` (1 if the image counts), all (B,) float64.
    `summarize_depth` of their sums gives the per-image average."""
    if pred.ndim == 4:
        pred, target = pred.squeeze(1), target.squeeze(1)
    out = {k: torch.zeros(pred.shape[0], dtype=torch.float64) for k in (*DEPTH_METRICS, "count")}
    for i in range(pred.shape[0]):
        values = depth_metrics(pred[i], target[i], min_depth, max_depth)
        if values is not None:
            for key, value in values.items():
                out[key][i] = value
            out["count"][i] = 1.0
    return {k: v.to(pred.device) for k, v in out.items()}


def summarize_depth(totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Summed `depth_metric_sums` -> mean over counted images (NaN when none counted)."""
    count = float(totals["count"])
    means = {k: float(totals[k]) / count if count else math.nan for k in DEPTH_METRICS}
    return {**means, "images": count}


DEPTH_TABLE_BINS = 10  # per-depth-bin table: equal bins of ground-truth depth from 0 to max_depth


def depth_bin_edges(max_depth: float, bins: int = DEPTH_TABLE_BINS) -> torch.Tensor:
    """(bins + 1,) float64 edges 0, max_depth / bins, ..., max_depth of the per-bin table."""
    return torch.linspace(0.0, max_depth, bins + 1, dtype=torch.float64)


def depth_bin_sums(
    pred: torch.Tensor,
    target: torch.Tensor,
    edges: torch.Tensor,
    min_depth: float = 1e-3,
    max_depth: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample, per-bin sums over the valid pixels of each counted image (the images
    `depth_metric_sums` counts): `bin_pixels`, `bin_d1` (pixels with max(p/g, g/p) < 1.25) and
    `bin_abs_rel` (sum of |p - g| / g), each (B, bins) float64; a pixel's bin is that of its
    ground truth, [edges[i], edges[i + 1]) (the last bin includes its upper edge)."""
    if pred.ndim == 4:
        pred, target = pred.squeeze(1), target.squeeze(1)
    bins = len(edges) - 1
    out = {k: torch.zeros(pred.shape[0], bins, dtype=torch.float64) for k in ("bin_pixels", "bin_d1", "bin_abs_rel")}  # fmt: skip
    inner = edges[1:-1].double().to(pred.device)
    for i in range(pred.shape[0]):
        valid = depth_valid_mask(target[i], min_depth, max_depth)
        if int(valid.sum()) < MIN_VALID_PIXELS:
            continue  # skipped, as in the per-image metrics
        p, g = pred[i][valid].clamp_min(min_depth).double(), target[i][valid].double()
        index = torch.bucketize(g, inner, right=True)  # (n,) in 0..bins-1
        hits = (torch.maximum(g / p, p / g) < 1.25).double()
        out["bin_pixels"][i] = torch.bincount(index, minlength=bins).double()
        out["bin_d1"][i] = torch.bincount(index, weights=hits, minlength=bins)
        out["bin_abs_rel"][i] = torch.bincount(index, weights=(p - g).abs() / g, minlength=bins)
    return {k: v.to(pred.device) for k, v in out.items()}


def depth_bin_table(totals: Mapping[str, torch.Tensor], edges: torch.Tensor) -> list[dict[str, float | None]]:  # fmt: skip
    """Summed `depth_bin_sums` -> one row per bin: `from` / `to` (metres), `pixels`, `d1` (%)
    and `abs_rel` over the bin's pixels (None for an empty bin)."""
    rows = []
    for i in range(len(edges) - 1):
        n = float(totals["bin_pixels"][i])
        d1 = float(totals["bin_d1"][i]) / n * 100 if n else None
        abs_rel = float(totals["bin_abs_rel"][i]) / n if n else None
        rows.append({"from": float(edges[i]), "to": float(edges[i + 1]), "pixels": int(n), "d1": d1, "abs_rel": abs_rel})  # fmt: skip
    return rows


def silog_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid_mask: torch.Tensor,
    lambd: float = SILOG_LAMBDA,
) -> torch.Tensor:
    """Scale-invariant log loss sqrt(mean(d^2) - lambd * mean(d)^2), d = log(target) - log(pred),
    pooled over the valid pixels of the whole batch (as the reference). The caller clamps `pred`
    at min_depth. No valid pixel: 0, still connected to `pred` (backward gives zero gradients).
    Masked sums rather than indexing by the mask: nothing is read back to the host (a training
    step must not wait for the device)."""
    count = valid_mask.sum().clamp_min(1)
    safe_target = torch.where(valid_mask, target, torch.ones_like(target))  # no log(0) elsewhere
    d = torch.where(valid_mask, torch.log(safe_target) - torch.log(pred), 0.0)
    mean, mean_sq = d.sum() / count, (d**2).sum() / count
    # A floor, not an epsilon added: sqrt's gradient at exactly 0 would be inf * 0 = NaN.
    loss = (mean_sq - lambd * mean**2).clamp_min(1e-12).sqrt()
    return torch.where(valid_mask.any(), loss, pred.sum() * 0.0)


# ---- segmentation -----------------------------------------------------------------------------
def intersection_and_union(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class pixel counts of one image or batch (same shapes, class ids): intersection,
    union and target area, each (num_classes,) int64. Pixels where target == ignore_index do
    not count (whatever is predicted there); any other target outside [0, num_classes) is an
    error (e.g. a mask that still needs "reduce zero label")."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = sorted({int(v) for v in t[(t < 0) | (t >= num_classes)].unique()[:5]})
        raise ValueError(f"target holds class ids {bad} outside 0..{num_classes - 1} and {ignore_index}")  # fmt: skip
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"prediction holds class ids outside 0..{num_classes - 1}")
    intersection = torch.bincount(t[p == t], minlength=num_classes)
    area_pred = torch.bincount(p, minlength=num_classes)
    area_target = torch.bincount(t, minlength=num_classes)
    return intersection, area_pred + area_target - intersection, area_target


def miou(intersection_sum: torch.Tensor, union_sum: torch.Tensor) -> float:
    """Mean IoU in percent over the classes with union > 0 (a class neither present nor
    predicted anywhere in the set is left out, not counted as 0 or 1); NaN if none."""
    present = union_sum > 0
    if not bool(present.any()):
        return math.nan
    iou = intersection_sum[present].double() / union_sum[present].double()
    return float(iou.mean() * 100)


def segmentation_stats(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> dict[str, torch.Tensor]:
    """Per-sample statistics of a batch (pred, target: (B, H, W) class ids) to be summed:
    `intersection`, `union`, `target_area`, each (B, num_classes)."""
    rows = [
        intersection_and_union(p, t, num_classes, ignore_index)
        for p, t in zip(pred, target, strict=True)
    ]
    names = ("intersection", "union", "target_area")
    return {name: torch.stack([r[i] for r in rows]) for i, name in enumerate(names)}


def summarize_segmentation(totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Summed `segmentation_stats` -> mIoU, pixel accuracy `acc` and mean class accuracy
    `macc` (classes present in the targets), all in percent."""
    inter, union, area = totals["intersection"], totals["union"], totals["target_area"]
    present = area > 0
    acc = float(inter.sum().double() / area.sum().double() * 100) if area.sum() else math.nan
    macc = (
        float((inter[present].double() / area[present].double()).mean() * 100)
        if bool(present.any())
        else math.nan
    )
    return {"miou": miou(inter, union), "acc": acc, "macc": macc}


def class_table(
    totals: Mapping[str, torch.Tensor], class_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Summed `segmentation_stats` -> one row per class: `class` (its index), `name` (when the
    dataset names its classes), `iou` (%, None when the class is neither in the targets nor
    predicted: left out of mIoU), `acc` (% of its pixels labelled right, None when it has none)
    and `pixels` (its labelled pixels)."""
    # (K,) sums; per-sample (B, K) statistics are summed first
    inter, union, area = (totals[k].double().reshape(-1, totals[k].shape[-1]).sum(0) for k in ("intersection", "union", "target_area"))  # fmt: skip
    rows = []
    for k in range(len(inter)):
        row: dict[str, Any] = {"class": k}
        if class_names is not None:
            row["name"] = class_names[k]
        row["iou"] = float(inter[k] / union[k] * 100) if union[k] > 0 else None
        row["acc"] = float(inter[k] / area[k] * 100) if area[k] > 0 else None
        row["pixels"] = int(area[k])
        rows.append(row)
    return rows
