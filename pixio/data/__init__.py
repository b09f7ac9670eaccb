"""Pixio pre-training data: the webdataset stream, curation statistics, shard tools, demo set.

`build_pretrain_dataset` is the entry point (docs/data.md); `python -m pixio.data.curate`,
`python -m pixio.data.make_shards` and `python -m pixio.data.demo` are the tools around it.
Names are imported on first use (`pixio._lazy`): the `data` config group
(`pixio.data.config`) is checked before webdataset or torch loads.
"""

from pixio._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "REASONS": "pixio.data.counters",
    "FilterConfig": "pixio.data.filters",
    "PretrainDataset": "pixio.data.pipeline",
    "build_pretrain_dataset": "pixio.data.pipeline",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
