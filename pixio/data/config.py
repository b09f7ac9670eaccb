"""The `data` group every job that reads the pre-training shards shares (pre-training,
distillation): its schema and its checks.

`check_data` checks the values, then that the paths exist, before any model or GPU is touched;
it raises `ConfigError("data.<key>: <why>")` like the other groups of `pixio.runtime.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from pixio.runtime.config import check_choice, check_positive, require


@dataclass
class DataConfig:
    root: str = MISSING  # shard root (kind=imagenet: *train*.tar; kind=web: **/*.tar)
    kind: str = "imagenet"  # imagenet | web
    json_root: str | None = None  # per-shard curation statistics (kind=web); an existing folder
    hist_thresh: float | None = None  # keep images with histogram_score > this
    imgres_thresh: int | None = None  # keep images whose both sides are >= this
    soft_sampling: bool = False  # keep an image with probability mae_loss
    missing_json: str = "unfiltered"  # shard without statistics: unfiltered | skip
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop scale
    shuffle_buffer: int = 10000  # shuffle buffer of encoded samples, per worker (count bound)
    shuffle_buffer_mb: float = 1024  # ... and its byte bound in MiB per worker (docs/data.md)
    shard_interleave: int = 8  # shards each worker reads at once (round-robin)
    shard_list: str | None = None  # file (from the cwd) of shard paths (relative: to root)
    num_workers: int = 6  # data-loader workers per process
    build_demo: bool = False  # build the demo shards under `root` (absent, empty or a demo)


def check_data(d: Any) -> None:
    """The `data` group: values first, then the paths (existence only)."""
    check_data_values(d)
    check_data_paths(d)


def check_data_values(d: Any) -> None:
    """Choices, counts and ranges of the `data` group (no file system access)."""
    check_choice(d, "data", "kind", ("imagenet", "web"))
    check_choice(d, "data", "missing_json", ("unfiltered", "skip"))
    require(bool(d.root), "data.root", "is empty")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    require(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    check_positive(d, "data", "shuffle_buffer_mb", "shard_interleave")
    require(d.shard_list is None or bool(d.shard_list), "data.shard_list", "is empty (use null)")
    require(d.json_root is None or bool(d.json_root), "data.json_root", "is empty (use null)")
    scale = list(d.crop_scale)
    require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "data.crop_scale", f"must be [min, max] with 0 < min <= max <= 1, got {scale}")  # fmt: skip
    _check_filters(d)


def _check_filters(d: Any) -> None:
    """Filters read the statistics of web shards: kind=web and a json_root (the demo's own with
    data.build_demo)."""
    active = d.hist_thresh is not None or d.imgres_thresh is not None or d.soft_sampling
    if d.build_demo:  # web shards with their own statistics (json_root is the demo's)
        require(d.kind == "web", "data.kind", f"must be web with data.build_demo (the demo shards are web tars), got {d.kind!r}")  # fmt: skip
        return
    require(not active or d.kind == "web", "data.kind", f"the filters (hist_thresh, imgres_thresh, soft_sampling) apply to kind web only, not {d.kind!r}")  # fmt: skip
    require(not active or d.json_root is not None, "data.json_root", "is required by the filters (hist_thresh, imgres_thresh, soft_sampling)")  # fmt: skip


def check_data_paths(d: Any) -> None:
    """Existence only: a web root at scale holds ~100k tars on shared storage, never globbed here."""
    root = Path(d.root).expanduser()
    if d.build_demo:
        _check_demo_root(root)
    else:
        require(root.is_dir(), "data.root", f"{root} does not exist or is not a directory")
    if d.json_root is not None and not d.build_demo:  # the demo uses its own statistics
        json_root = Path(d.json_root).expanduser()
        require(json_root.is_dir(), "data.json_root", f"{json_root} does not exist or is not a directory")  # fmt: skip
    if d.shard_list is not None:  # read from the working directory, as pixio.data reads it
        shard_list = Path(d.shard_list).expanduser()
        require(shard_list.is_file(), "data.shard_list", f"{shard_list} does not exist or is not a file")  # fmt: skip


def _check_demo_root(root: Path) -> None:
    """The demo is built under an absent or empty root, or rebuilt in a demo's own folder;
    never inside someone else's data (a rebuild replaces `shards/` and `json/` there)."""
    from pixio.data.demo import is_demo_root

    if not root.exists():
        return
    require(root.is_dir(), "data.root", f"{root} is not a directory (data.build_demo)")
    empty = next(root.iterdir(), None) is None
    require(empty or is_demo_root(root), "data.root", f"{root} holds other data, not a demo set; data.build_demo builds only in an absent, empty or demo folder")  # fmt: skip
