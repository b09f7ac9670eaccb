"""Evaluation datasets in the public releases' layouts (NYUv2, KITTI, ADE20K, Pascal VOC, LoveDA).

Imports only torch, numpy, PIL and pixio. See docs/evaluation.md, "Datasets".
"""

from evaluation.datasets.base import DepthDataset, SegDataset, build_dataset
from evaluation.datasets.info import DATASETS, DatasetInfo, get_info
from evaluation.datasets.splits import (
    read_split_list,
    scan_layout,
    split_list_path,
    write_split_list,
)
from evaluation.datasets.transforms import IGNORE_INDEX, UnreadableImageError

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "DatasetInfo",
    "DepthDataset",
    "SegDataset",
    "UnreadableImageError",
    "build_dataset",
    "get_info",
    "read_split_list",
    "scan_layout",
    "split_list_path",
    "write_split_list",
]
