"""Where each dataset lives on this machine: the `paths` config group (`configs/paths/`).

The apps' data roots are interpolations of it (`configs/dataset/nyuv2.yaml`: `data.root:
${paths.nyuv2}`; the k-NN app: `${paths.imagenet_folders}`), so one site file gives every app
its own dataset, and no app picks up a root meant for another. A site sets the paths once, in
the git-ignored `configs/local/paths.yaml` (README, "Machine paths"); a command line may still
set `data.root` for one run. A path a run needs but nobody set is one ConfigError naming the
`paths.<name>` key to set (`check_path_refs`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from pixio.runtime.config import ConfigError


@dataclass
class PathsConfig:
    imagenet_wds: str = MISSING  # ImageNet-1k webdataset shards, <root>/*train*.tar (data=imagenet)
    imagenet_folders: str = (
        MISSING  # ImageNet-1k class folders train/<class>/*, val/<class>/* (k-NN)
    )
    web: str = MISSING  # curated web shards, <root>/**/*.tar (data=web)
    nyuv2: str = MISSING  # NYUv2 depth in its release layout (sync/, official_splits/test/)
    kitti: str = MISSING  # KITTI depth: images/ and annotations/ (Eigen split lists)
    ade20k: str = MISSING  # ADEChallengeData2016: images/ and annotations/
    pascal: str = MISSING  # Pascal VOC 2012 (VOCdevkit/VOC2012: JPEGImages/, SegmentationClass/)
    loveda: str = MISSING  # LoveDA: Train/ and Val/


PATH_KEYS = tuple(f.name for f in fields(PathsConfig))
_REF = re.compile(r"\$\{paths\.([A-Za-z0-9_]+)\}")
SITE_FILE = "configs/local/paths.yaml"


def path_refs(cfg: DictConfig, key: str) -> list[str]:
    """The `paths.<name>` names that `key` (e.g. "data.root") interpolates, unresolved; [] when
    it holds a plain value (given on the command line) or does not exist."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return []
    raw = OmegaConf.to_container(node, resolve=False).get(leaf)  # type: ignore[union-attr]
    return _REF.findall(raw) if isinstance(raw, str) else []


def check_path_refs(cfg: Any, *keys: str) -> None:
    """ConfigError naming the first `paths.<name>` that one of `keys` needs and nobody set, and
    how to set it (the site file, or the command line for one run)."""
    for key in keys:
        for name in path_refs(cfg, key):
            unknown = name not in PATH_KEYS
            if unknown or OmegaConf.is_missing(cfg.paths, name):
                why = "is not a known path" if unknown else "is not set"
                raise ConfigError(
                    f"paths.{name}: {why} ({key} is ${{paths.{name}}}): put `{name}: /your/path` "
                    f"in {SITE_FILE}, or give paths.{name}=... (or {key}=... for this run)"
                )
