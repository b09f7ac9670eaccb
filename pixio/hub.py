"""torch.hub entry points (the repository's `hubconf.py`) and the full pre-training model's loader.

    encoder = torch.hub.load("path/to/pixio", "pixio_vith16", source="local", weights="enc.pth")
    mae = torch.hub.load("path/to/pixio", "pixio_mae_vith16", source="local",
                         weights="run/checkpoint-last")

One encoder entry per registry size (`pixio_vitt16` ... `pixio_vit5b16`) and one pre-training
model entry per size (`pixio_mae_*`). They return exactly what `pixio.load_encoder` /
`pixio.build_mae` return. `weights` is a local path (any format `pixio.load_encoder` reads; for
the MAE, a checkpoint that holds the decoder) or None for random weights; nothing is downloaded.
Size overrides are those of `build_encoder` / `build_mae` (`depth=4`, `img_size=512`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pixio.checkpoint import load_encoder, read_state_dict, state_mismatch
from pixio.models.encoder import PixioEncoder
from pixio.models.mae import DECODER_PREFIXES, PixioMAE
from pixio.models.registry import build_encoder, build_mae, list_models

MAE_PREFIX = "pixio_mae_"


class EncoderOnlyCheckpointError(ValueError):
    """A checkpoint without the decoder where the full pre-training model is needed."""


def load_mae(name: str, path: str | Path, module: str | None = None, **overrides: Any) -> PixioMAE:
    """Build the pre-training model `name` (encoder + decoder) and load a checkpoint that holds
    both, strictly: a pre-training checkpoint directory (`output_dir/checkpoint-N`, module
    "mae") or a `.pth` file with a `'model'` entry. An encoder-only file is refused in one line
    (EncoderOnlyCheckpointError); other mismatches name the keys (ValueError)."""
    source = str(path) if module is None else f"{path} (module {module!r})"
    state = read_state_dict(path, module)
    if not any(k.startswith(DECODER_PREFIXES) for k in state):
        raise EncoderOnlyCheckpointError(
            f"{source} holds an encoder only (no decoder_* weights): the pre-training model needs "
            "a full pre-training checkpoint (output_dir/checkpoint-N, or a file whose 'model' "
            "entry holds the decoder)"
        )
    mae = build_mae(name, **overrides)
    problem = state_mismatch(mae, state, source)
    if problem is not None:
        raise ValueError(problem)
    mae.load_state_dict(state, strict=True)
    return mae


def encoder_entry(name: str) -> Callable[..., PixioEncoder]:
    """The torch.hub entry of encoder `name`."""

    def entry(
        weights: str | Path | None = None, module: str | None = None, **overrides: Any
    ) -> PixioEncoder:
        if weights is None:
            return build_encoder(name, **overrides)
        return load_encoder(name, weights, module, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"Pixio encoder {name}: `weights` a local checkpoint (any format pixio.load_encoder "
        "reads; `module` picks the trained module of a training checkpoint) or None for random "
        "weights; overrides as build_encoder's (depth, img_size, ...)."
    )
    return entry


def mae_entry(name: str) -> Callable[..., PixioMAE]:
    """The torch.hub entry of the pre-training model of encoder `name`."""

    def entry(
        weights: str | Path | None = None, module: str | None = None, **overrides: Any
    ) -> PixioMAE:
        if weights is None:
            return build_mae(name, **overrides)
        return load_mae(name, weights, module, **overrides)

    entry.__name__ = entry.__qualname__ = MAE_PREFIX + name.removeprefix("pixio_")
    entry.__doc__ = (
        f"Pixio pre-training model (encoder + decoder) of {name}: `weights` a local checkpoint "
        "holding the decoder (a pre-training checkpoint directory or a file with 'model') or "
        "None for random weights; overrides as build_mae's (depth, decoder_depth, ...)."
    )
    return entry


def hub_entries() -> dict[str, Callable[..., Any]]:
    """Entry name -> function, for every registry size: `pixio_<size>` and `pixio_mae_<size>`."""
    entries: dict[str, Callable[..., Any]] = {}
    for name in list_models():
        for make in (encoder_entry, mae_entry):
            entry = make(name)
            entries[entry.__name__] = entry
    return entries
