"""The shard stream of a `data` group, batched per process for the whole run: what pre-training
and distillation train on.

Failures that are really settings (no shard under data.root, an unreadable or incomplete shard
list) surface as ConfigError naming the key, like `check_data`'s. The stream's ValueErrors are
not translated: `check_data` refuses every value that would raise one.
"""

from __future__ import annotations

from typing import Any

import torch

from pixio.runtime.config import ConfigError
from pixio.runtime.loader import EpochLoader


def build_data(d: Any, t: Any, img_size: int, rank: int, world_size: int) -> EpochLoader:
    """The webdataset stream of data group `d` with crops of `img_size`, batched as the train
    group `t` says (batch_size, seed, iters_per_epoch, device)."""
    from pixio.data import build_pretrain_dataset

    root, json_root = _data_paths(d)
    try:
        dataset = build_pretrain_dataset(
            root, kind=d.kind, input_size=img_size, crop_scale=tuple(d.crop_scale),
            json_root=json_root, hist_thresh=d.hist_thresh, imgres_thresh=d.imgres_thresh,
            soft_sampling=d.soft_sampling, seed=t.seed, missing_json=d.missing_json,
            rank=rank, world_size=world_size, shuffle_buffer=d.shuffle_buffer,
            shuffle_buffer_mb=d.shuffle_buffer_mb, shard_interleave=d.shard_interleave,
            shard_list=d.shard_list,
        )  # fmt: skip
    except FileNotFoundError as err:  # shard discovery: the list when one is given, else the root
        raise ConfigError(f"{'data.shard_list' if d.shard_list else 'data.root'}: {err}") from None
    pin = torch.cuda.is_available() and t.device != "cpu"
    return EpochLoader(dataset, t.batch_size, d.num_workers, t.seed, t.iters_per_epoch, pin)


def _data_paths(d: Any) -> tuple[str, str | None]:
    """(shard root, statistics root): the configured ones, or the demo set's, built if missing."""
    if not d.build_demo:
        return d.root, d.json_root
    from pixio.data.demo import ensure_demo_data

    paths = ensure_demo_data(d.root)
    return paths["shards"], paths["json_root"]


def images_and_noise(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stream batch as (images (B, 3, H, W), masking noise or None): the stream yields image
    tensors; tests pass {"image", "noise"} dicts to fix the masking."""
    if isinstance(batch, dict):
        return batch["image"], batch.get("noise")
    return batch, None
