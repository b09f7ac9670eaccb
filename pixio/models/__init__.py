"""Pixio models: encoder, pre-training MAE, masking, registry.

Names are imported on first use (`pixio._lazy`): `pixio.models.registry`'s size table is read by
config checks that must not load torch.
"""

from pixio._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "ENCODER_SIZES": "pixio.models.registry",
    "GroupMask": "pixio.models.masking",
    "MAEOutput": "pixio.models.mae",
    "PixioEncoder": "pixio.models.encoder",
    "PixioMAE": "pixio.models.mae",
    "build_encoder": "pixio.models.registry",
    "build_mae": "pixio.models.registry",
    "group_masking": "pixio.models.masking",
    "list_models": "pixio.models.registry",
    "patchify": "pixio.models.patchify",
    "unpatchify": "pixio.models.patchify",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
