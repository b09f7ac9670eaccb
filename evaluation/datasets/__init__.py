"""Evaluation datasets in the public releases' layouts (NYUv2, KITTI, ADE20K, Pascal VOC, LoveDA).

Imports only torch, numpy, PIL and pixio. See docs/evaluation.md, "Datasets". Names are imported
on first use (`pixio._lazy`): the apps' config checks read the dataset table (`info`) without
loading torch.
"""

from pixio._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "DATASETS": "evaluation.datasets.info",
    "DatasetInfo": "evaluation.datasets.info",
    "DepthDataset": "evaluation.datasets.base",
    "IGNORE_INDEX": "evaluation.datasets.transforms",
    "SegDataset": "evaluation.datasets.base",
    "UnreadableImageError": "evaluation.datasets.transforms",
    "build_dataset": "evaluation.datasets.base",
    "get_info": "evaluation.datasets.info",
    "read_split_list": "evaluation.datasets.splits",
    "scan_layout": "evaluation.datasets.splits",
    "split_list_path": "evaluation.datasets.splits",
    "write_split_list": "evaluation.datasets.splits",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
