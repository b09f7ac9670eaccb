"""Pixio: pixel-supervised pre-training of vision encoders.

Public API: `build_encoder`, `build_mae`, `load_encoder`, `save_encoder`, `export_hf`,
`patchify`, `unpatchify`, `list_models`. Each name is imported on first use, so `import pixio`
loads neither torch nor timm: a command line checks its config first (docs/performance.md).
Importing pixio also sets OpenMP's passive wait policy unless the environment has one
(`pixio.runtime.threads`; it must happen before torch loads), and registers Pixio's encoders
with timm as soon as timm is imported (`pixio.timm_models`).
"""

from pixio.runtime.threads import default_wait_policy as _default_wait_policy

_default_wait_policy()  # first of all: libgomp reads OMP_WAIT_POLICY once, when torch loads it

from pixio._lazy import after_import as _after_import  # noqa: E402
from pixio._lazy import lazy_exports as _lazy_exports  # noqa: E402

_EXPORTS = {
    "MAEOutput": "pixio.models.mae",
    "PixioEncoder": "pixio.models.encoder",
    "PixioMAE": "pixio.models.mae",
    "build_encoder": "pixio.models.registry",
    "build_mae": "pixio.models.registry",
    "export_hf": "pixio.hf",
    "list_models": "pixio.models.registry",
    "load_encoder": "pixio.checkpoint",
    "patchify": "pixio.models.patchify",
    "read_state_dict": "pixio.checkpoint",
    "save_encoder": "pixio.checkpoint",
    "unpatchify": "pixio.models.patchify",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
_after_import("timm", "pixio.timm_models")  # `import pixio, timm`: timm.create_model("pixio_*")
