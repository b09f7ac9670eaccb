"""Weighted k-NN classification of global features: the maths the k-NN evaluation app
(`evaluation.knn`) and pre-training's online monitor (`pixio.monitor`) share, the global
feature extraction they share with the linear probe (`evaluation.linear`: `pooled_features`),
and the demo ImageFolder all of them can build from the bundled photos.

Feature: mean of the class tokens of the last block BEFORE the final norm, L2-normalised.
Classification: cosine similarity to every training feature, the k nearest vote with weight
exp(sim / T), top-1 / top-5 accuracy in percent. Votes are summed in log space, so a small T
cannot overflow exp(sim / T) (float32 overflows for sim / T > 88.7: at T = 0.01, for sim > 0.887).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from pixio.models.features import FeatureEncoder
from pixio.runtime.choices import FEATURE_POOLS

DEMO_CLASSES = ("astronaut", "coffee", "chelsea", "rocket", "sklearn_china", "sklearn_flower")

POOLS = FEATURE_POOLS


def pooled_features(
    encoder: FeatureEncoder, images: torch.Tensor, pool: str = "cls", normed: bool = True
) -> torch.Tensor:
    """Global features of the last block, float32: (B, 3, H, W) -> (B, D), or (B, 2D) for
    `both`. `cls`: the mean of the class tokens (one for a baseline encoder); `avgpool`: the
    mean of the patch tokens; `both`: [cls, avgpool]. Tokens after the final norm (`normed`) or
    before it. The one feature extraction of k-NN, its monitor and the linear probe."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    block = encoder.features(images, [-1])[0]
    suffix = "_norm" if normed else ""
    parts = []
    if pool in ("cls", "both"):
        parts.append(block[f"cls_tokens{suffix}"].float().mean(dim=1))  # (B, n_cls, D) -> (B, D)
    if pool in ("avgpool", "both"):
        parts.append(block[f"patch_tokens{suffix}"].float().mean(dim=1))  # (B, h*w, D) -> (B, D)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def global_features(encoder: FeatureEncoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D): k-NN's feature, the mean class token of the last block before
    the final norm, L2-normalised (in float32)."""
    return F.normalize(pooled_features(encoder, images, "cls", normed=False), dim=1)


def knn_hits(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_size: int = 128,
) -> dict[int, torch.Tensor]:
    """{k: (top-1 hits, top-5 hits)} (int64 tensors of 2, on the CPU) of the test features,
    from one neighbour search: counts, so that parts of a test set classified apart (one per
    rank) add up. An empty test set gives zeros. See `knn_evaluate`."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.to(train.device).long()
    k_max = min(max(ks), train.shape[0])
    correct = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start : start + chunk_size].to(train.device)  # (c, D)
        sims, idx = (chunk @ train.T).topk(k_max, dim=1)  # (c, k_max), sorted descending
        labels = test_labels[start : start + chunk_size].to(train.device).long()
        for k in ks:
            votes = log_votes(sims[:, :k], train_labels[idx[:, :k]], temperature, num_classes)
            correct[k] += hits(votes, labels)
    return correct


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    chunk_size: int = 128,
) -> dict[int, tuple[float, float]]:
    """{k: (top1, top5)} in percent for several k from one neighbour search.

    Features (N, D) are L2-normalised here (idempotent for normalised inputs). k larger than the
    training set is clamped to its size; a class without votes never counts as a top-5 hit.
    Votes are exact for any temperature > 0 (log space, `log_votes`). Memory: one chunk of
    chunk_size x N_train similarities at a time."""
    check_knn_inputs(train_features, train_labels, test_features, test_labels, ks)
    correct = knn_hits(
        train_features, train_labels, test_features, test_labels, ks, temperature,
        num_classes, chunk_size,
    )  # fmt: skip
    n = test_features.shape[0]
    return {k: (float(c[0]) * 100 / n, float(c[1]) * 100 / n) for k, c in correct.items()}


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 128,
) -> tuple[float, float]:
    """(top1, top5) in percent of weighted k-NN; see `knn_evaluate`."""
    results = knn_evaluate(
        train_features, train_labels, test_features, test_labels, [k], temperature,
        num_classes, chunk_size,
    )  # fmt: skip
    return results[k]


def log_votes(sims: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:  # fmt: skip
    """Class scores (c, num_classes): log of the sum of exp(sim / T) over the class's neighbours
    (sims, labels: (c, k)), -inf for a class without one. Each class's largest sim / T is taken
    out before the exp (log-sum-exp), so every exp is in (0, 1]: nothing overflows (a plain
    exp(sim / T) is inf in float32 above 88.7) and no class's votes vanish, for any T > 0."""
    logits = sims / temperature  # (c, k)
    shape = (sims.shape[0], num_classes)
    peak = torch.full(shape, -torch.inf, device=sims.device, dtype=sims.dtype)
    peak.scatter_reduce_(1, labels, logits, "amax")  # (c, K): each class's largest sim / T
    sums = torch.zeros(shape, device=sims.device, dtype=sims.dtype)
    sums.scatter_add_(1, labels, (logits - peak.gather(1, labels)).exp())  # each class in [1, k]
    return peak + sums.log()  # -inf + log 0 = -inf where a class got no vote


def hits(votes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits) of one chunk from log-votes. A class no neighbour voted for is
    never a hit, even when fewer than 5 classes got votes (which zero-vote class topk returns
    is arbitrary)."""
    top = votes.topk(min(5, votes.shape[1]), dim=1)  # (c, 5)
    match = (top.indices == labels[:, None]) & top.values.isfinite()
    return torch.stack([match[:, 0].sum(), match.any(dim=1).sum()]).cpu()


def check_knn_inputs(
    train_f: torch.Tensor,
    train_l: torch.Tensor,
    test_f: torch.Tensor,
    test_l: torch.Tensor,
    ks: Sequence[int],
) -> None:
    """ValueError unless features are (N, D) with one D, one label per row, both sets
    non-empty and every k positive."""
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(f"features must be (N, D) with one D, got {tuple(train_f.shape)} and {tuple(test_f.shape)}")  # fmt: skip
    if len(train_l) != len(train_f) or len(test_l) != len(test_f):
        raise ValueError("one label per feature row is needed")
    if len(train_f) == 0 or len(test_f) == 0:
        raise ValueError("k-NN needs at least one training and one test sample")
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive, got {list(ks)}")


def build_demo_folders(
    root: str | Path, train_per_class: int = 16, val_per_class: int = 6, short_side: int = 160
) -> Path:
    """A small ImageFolder (train/, val/) from the bundled demo photos: each class is random
    crops (25-100 % area) and flips of one photo. Skipped when `root/.complete` exists."""
    from pixio.data.demo import SOURCES, as_uint8_image
    from pixio.data.images import draw_crop_box

    root = Path(root)
    if (root / ".complete").is_file():
        return root
    for c, name in enumerate(DEMO_CLASSES):
        photo = as_uint8_image(np.asarray(SOURCES[name][0]()))
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            rng = np.random.default_rng([c, split == "val"])
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                box = draw_crop_box(photo.width, photo.height, rng, (0.25, 1.0))
                img = photo.crop(box)
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                scale = short_side / min(img.size)
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)  # fmt: skip
                img.save(folder / f"{i:03d}.jpg", quality=90)
    (root / ".complete").write_text("knn demo\n")
    return root
