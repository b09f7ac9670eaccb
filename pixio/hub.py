"""torch.hub entry points (the repository's `hubconf.py`) and the full pre-training model's loader.

    encoder = torch.hub.load("path/to/pixio", "pixio_vith16", source="local", weights="enc.pth")
    mae = torch.hub.load("path/to/pixio", "pixio_mae_vith16", source="local",
                         weights="run/checkpoint-last")
    mae = pixio.hub.load_mae("mae.safetensors")  # a full file of `python -m pixio.convert --full`

One encoder entry per registry size (`pixio_vitt16` ... `pixio_vit5b16`) and one pre-training
model entry per size (`pixio_mae_*`). They return exactly what `pixio.load_encoder` /
`pixio.build_mae` return. `weights` is a local path (any format `pixio.load_encoder` reads; for
the MAE, a checkpoint that holds the decoder) or None for random weights; nothing is downloaded.
Size overrides are those of `build_encoder` / `build_mae` (`depth=4`, `img_size=512`, ...); a
file that records its architecture (`pixio.architecture`) needs none, and one that disagrees with
it is refused in one line naming the differing sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pixio.architecture import describe, resolve
from pixio.checkpoint import load_encoder, read_architecture, read_state_dict, state_mismatch
from pixio.models.encoder import PixioEncoder
from pixio.models.mae import DECODER_PREFIXES, PixioMAE
from pixio.models.registry import build_encoder, build_mae, list_models

MAE_PREFIX = "pixio_mae_"


class EncoderOnlyCheckpointError(ValueError):
    """A checkpoint without the decoder where the full pre-training model is needed."""


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load; ValueError in one line naming the missing, unexpected and mis-shaped keys of
    checkpoint `source`."""
    problem = state_mismatch(module, state, source)
    if problem is not None:
        raise ValueError(problem)
    module.load_state_dict(state, strict=True)


def load_mae(
    name_or_path: str | Path | None,
    path: str | Path | None = None,
    module: str | None = None,
    **overrides: Any,
) -> PixioMAE:
    """Build the pre-training model (encoder + decoder) and load a checkpoint that holds both,
    strictly: `load_mae(path)` for a file that records its architecture (a full file of
    `python -m pixio.convert --full`, a pre-training checkpoint directory `output_dir/
    checkpoint-N`), `load_mae(name, path, **overrides)` otherwise (a `.pth` file with a
    `'model'` entry). An encoder-only file is refused in one line
    (EncoderOnlyCheckpointError); other mismatches name the sizes or keys (ValueError)."""
    if path is None:  # load_mae(path)
        name_or_path, path = None, name_or_path
    source = str(path) if module is None else f"{path} (module {module!r})"
    arch = read_architecture(path, module)  # a checkpoint dir: its run config (meta.pt) too
    if arch is not None and arch["kind"] != "mae":
        raise EncoderOnlyCheckpointError(
            f"{source} holds an encoder only ({describe(arch)}): {ENCODER_ONLY}"
        )
    name, kwargs = resolve(arch, name_or_path and str(name_or_path), overrides, source, "mae")
    state = read_state_dict(path, module)
    if not any(k.startswith(DECODER_PREFIXES) for k in state):
        raise EncoderOnlyCheckpointError(
            f"{source} holds an encoder only (no decoder_* weights): {ENCODER_ONLY}"
        )
    mae = build_mae(name, **kwargs)
    load_checked(mae, state, source)
    return mae


ENCODER_ONLY = (
    "the pre-training model needs a full file (python -m pixio.convert --full), "
    "a pre-training checkpoint (output_dir/checkpoint-N) or a file whose 'model' entry holds "
    "the decoder"
)


# entry kind -> (entry name prefix, random build, load, what `weights` must hold)
KINDS: dict[str, tuple[str, Callable[..., Any], Callable[..., Any], str]] = {
    "encoder": ("pixio_", build_encoder, load_encoder, "any format pixio.load_encoder reads"),
    "mae": (MAE_PREFIX, build_mae, load_mae, "the decoder too (a pre-training checkpoint)"),
}


def hub_entry(name: str, kind: str) -> Callable[..., PixioEncoder | PixioMAE]:
    """The torch.hub entry of encoder `name` ("encoder") or of its pre-training model ("mae")."""
    prefix, build, load, holds = KINDS[kind]

    def entry(
        weights: str | Path | None = None, module: str | None = None, **overrides: Any
    ) -> PixioEncoder | PixioMAE:
        if weights is None:
            return build(name, **overrides)
        return load(name, weights, module, **overrides)

    entry.__name__ = entry.__qualname__ = prefix + name.removeprefix("pixio_")
    entry.__doc__ = (
        f"Pixio {kind} {name}: `weights` a local checkpoint holding {holds} (`module`: the "
        "trained module of a training checkpoint), or None for random weights; overrides as "
        f"{build.__name__}'s (depth, img_size, ...)."
    )
    return entry


def hub_entries() -> dict[str, Callable[..., Any]]:
    """Entry name -> function, for every registry size: `pixio_<size>` and `pixio_mae_<size>`."""
    entries = [hub_entry(name, kind) for name in list_models() for kind in KINDS]
    return {entry.__name__: entry for entry in entries}
