"""Pixio pre-training data: the webdataset stream, curation statistics, shard tools, demo set.

`build_pretrain_dataset` is the entry point (docs/data.md); `python -m pixio.data.curate`,
`python -m pixio.data.make_shards` and `python -m pixio.data.demo` are the tools around it.
"""

from pixio.data.counters import REASONS
from pixio.data.filters import FilterConfig
from pixio.data.pipeline import PretrainDataset, build_pretrain_dataset

__all__ = ["REASONS", "FilterConfig", "PretrainDataset", "build_pretrain_dataset"]
