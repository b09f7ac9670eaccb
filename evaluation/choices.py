"""The values of the evaluation apps' choice keys and the lr grid's head names, in a module that
loads no torch: the config checks (`evaluation.common`, `evaluation.linear`) read them before
anything heavy is imported, and the modules that act on them (`heads`, `inference`, `selection`,
`grid`) import them from here."""

from __future__ import annotations

from collections.abc import Sequence

from pixio.runtime.config import require

HEAD_KINDS = ("linear", "dpt")  # head.name
DEPTH_OUTPUTS = ("regression", "bins")  # head.depth_output
BINS_NORMS = ("linear", "softmax")  # head.bins_norm
TTA_MODES = ("none", "flip", "multiscale")  # eval.tta
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # eval.tta_scales: mmsegmentation's aug-test ratios
SELECT_RULES = ("reference", "last", "holdout")  # eval.select

HEAD_PREFIX = "head_lr"  # a grid head's module name: head_lr<lr>


def head_name(lr: float) -> str:
    """`head_lr<lr>` in the shortest form that names it (`head_lr0.1`, `head_lr1e-05`)."""
    return f"{HEAD_PREFIX}{lr:g}"


def check_lrs(lrs: Sequence[float], key: str) -> None:
    """ConfigError naming `key` unless the lrs are a non-empty list of positive values whose
    head names differ."""
    values = list(lrs)
    require(len(values) > 0, key, "needs at least one lr")
    require(all(v > 0 for v in values), key, f"every lr must be positive, got {values}")
    names = [head_name(v) for v in values]
    require(len(set(names)) == len(names), key, f"holds the same lr twice ({', '.join(names)})")
