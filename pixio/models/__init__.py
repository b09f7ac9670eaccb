"""Pixio models: encoder, pre-training MAE, masking, registry."""

from pixio.models.encoder import PixioEncoder
from pixio.models.mae import MAEOutput, PixioMAE
from pixio.models.masking import GroupMask, group_masking
from pixio.models.patchify import patchify, unpatchify
from pixio.models.registry import ENCODER_SIZES, build_encoder, build_mae, list_models

__all__ = [
    "ENCODER_SIZES",
    "GroupMask",
    "MAEOutput",
    "PixioEncoder",
    "PixioMAE",
    "build_encoder",
    "build_mae",
    "group_masking",
    "list_models",
    "patchify",
    "unpatchify",
]
