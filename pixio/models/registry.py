"""Model registry: Pixio encoder and pre-training model sizes by name.

The table and its checks load no torch (config validation reads them before torch loads); the
model classes are imported by the builders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixio.models.encoder import PixioEncoder
    from pixio.models.mae import PixioMAE

# name -> (embed_dim, depth, num_heads); patch 16, input 256, 8 class tokens for all.
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "pixio_vitt16": (192, 12, 3),
    "pixio_vits16": (384, 12, 6),
    "pixio_vitb16": (768, 12, 12),
    "pixio_vitl16": (1024, 24, 16),
    "pixio_vith16": (1280, 32, 16),
    "pixio_vit1b16": (1536, 48, 24),
    "pixio_vit5b16": (3072, 48, 32),
}

ENCODER_OVERRIDES = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "n_cls_tokens",
    "drop_path",
)
MAE_OVERRIDES = (
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mask_grid",
    "norm_pix_loss",
)


def list_models() -> list[str]:
    """Registered model names, smallest first."""
    return list(ENCODER_SIZES)


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_img_size(img_size: Any, patch_size: int) -> None:
    sides = img_size if isinstance(img_size, (tuple, list)) else (img_size,)
    for side in sides:
        _positive("img_size", side)
        if side % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")


def validate_kwargs(kwargs: dict[str, Any]) -> None:
    """ValueError naming the bad key and the valid choices."""
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "n_cls_tokens"):
        _positive(key, kwargs[key])
    _check_img_size(kwargs["img_size"], kwargs["patch_size"])
    if kwargs["embed_dim"] % kwargs["num_heads"]:
        raise ValueError(
            f"embed_dim {kwargs['embed_dim']} is not divisible by num_heads {kwargs['num_heads']}"
        )
    if not 0.0 <= float(kwargs["drop_path"]) < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {kwargs['drop_path']}")


def _resolve(name: str, overrides: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    if name not in ENCODER_SIZES:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(ENCODER_SIZES)}")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid: {', '.join(allowed)}")
    dim, depth, heads = ENCODER_SIZES[name]
    kwargs: dict[str, Any] = dict(
        img_size=256, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
        n_cls_tokens=8, drop_path=0.0,
    )  # fmt: skip
    kwargs.update({k: v for k, v in overrides.items() if k in ENCODER_OVERRIDES})
    validate_kwargs(kwargs)
    return kwargs


def encoder_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The PixioEncoder arguments of `name` with `overrides` (checked), for wrappers that build
    an encoder subclass (e.g. a distillation student)."""
    return _resolve(name, overrides, ENCODER_OVERRIDES)


def build_encoder(name: str, **overrides: Any) -> PixioEncoder:
    """Build a Pixio encoder by name, e.g. `build_encoder("pixio_vith16", drop_path=0.4)`."""
    from pixio.models.encoder import PixioEncoder

    return PixioEncoder(**_resolve(name, overrides, ENCODER_OVERRIDES))


def build_mae(name: str, **overrides: Any) -> PixioMAE:
    """Build the pre-training model (encoder + 32-block decoder by default) by name."""
    kwargs = _resolve(name, overrides, ENCODER_OVERRIDES + MAE_OVERRIDES)
    dec = {k: overrides[k] for k in MAE_OVERRIDES if k in overrides}
    for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mask_grid"):
        if key in dec:
            _positive(key, dec[key])
    dim, heads = dec.get("decoder_embed_dim", 512), dec.get("decoder_num_heads", 16)
    if dim % heads:
        raise ValueError(f"decoder_embed_dim {dim} is not divisible by decoder_num_heads {heads}")
    from pixio.models.mae import PixioMAE

    return PixioMAE(**dec, **kwargs)
