"""Baseline encoders behind Pixio's feature API, for evaluation in the same harness.

`encoder.source` picks where an encoder comes from:

- `pixio`: the registry (`pixio.list_models()`), Pixio's own checkpoints;
- `transformers`: `ViTModel` (`vit`), `ViTMAEModel` (`vit_mae`, masking off), `Dinov2Model`
  (`dinov2`) and `Dinov2WithRegistersModel` (`dinov2_with_registers`) from a local folder
  (`from_pretrained`, never the hub) or from a config (random weights);
- `timm`: any timm `VisionTransformer` by name, hybrids (ResNet stem + ViT) included, with
  local weights.

Each adapter is a `pixio.models.features.FeatureEncoder` over the wrapped model (`.model`):
the heads, k-NN and the trainer use it exactly like a `PixioEncoder`. Images arrive normalised
with the ImageNet statistics (the protocol's); an adapter re-normalises them to the statistics
its model was trained with when these are known, an exact per-channel affine map.
"""

from __future__ import annotations

from typing import Any

from pixio.models.baselines.common import BaselineEncoder, BaselineError
from pixio.runtime.choices import ENCODER_SOURCES as SOURCES

BASELINE_SOURCES = tuple(s for s in SOURCES if s != "pixio")

__all__ = [
    "BASELINE_SOURCES",
    "SOURCES",
    "BaselineEncoder",
    "BaselineError",
    "build_baseline",
]


def build_baseline(
    source: str, name: str, checkpoint: str | None = None, **kwargs: Any
) -> BaselineEncoder:
    """The adapter of baseline `name` from `source`, built on the current default device with
    its library's initialisation (use `torch.device("meta")` to skip it when a checkpoint will
    fill it: see `BaselineEncoder.read_state`). `checkpoint` supplies the architecture where the
    format carries it (a transformers folder's config.json); `kwargs` change the architecture
    (the transformers config's fields; the timm constructor's arguments). BaselineError (a
    ValueError naming the `encoder` field at fault) for an unknown model, a checkpoint of another
    model or arguments the model does not take; ValueError for an unknown source."""
    if source == "transformers":
        from pixio.models.baselines.transformers_vit import build_transformers

        return build_transformers(name, checkpoint, **kwargs)
    if source == "timm":
        from pixio.models.baselines.timm_vit import build_timm

        return build_timm(name, **kwargs)
    raise ValueError(
        f"unknown baseline source {source!r}: one of {', '.join(BASELINE_SOURCES)}"
        " (pixio encoders come from pixio.build_encoder)"
    )
