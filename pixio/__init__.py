"""Pixio: pixel-supervised pre-training of vision encoders.

Public API: `build_encoder`, `build_mae`, `load_encoder`, `save_encoder`, `export_hf`,
`patchify`, `unpatchify`, `list_models`.
"""

from pixio import timm_models as _timm_models  # noqa: F401  (registers Pixio's encoders with timm)
from pixio.checkpoint import load_encoder, read_state_dict, save_encoder
from pixio.hf import export_hf
from pixio.models import (
    MAEOutput,
    PixioEncoder,
    PixioMAE,
    build_encoder,
    build_mae,
    list_models,
    patchify,
    unpatchify,
)

__all__ = [
    "MAEOutput",
    "PixioEncoder",
    "PixioMAE",
    "build_encoder",
    "build_mae",
    "export_hf",
    "list_models",
    "load_encoder",
    "patchify",
    "read_state_dict",
    "save_encoder",
    "unpatchify",
]
