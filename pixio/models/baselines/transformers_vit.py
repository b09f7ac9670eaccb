"""Hugging Face transformers ViT, ViTMAE and DINOv2 encoders behind Pixio's feature API.

Built from a local folder's config.json (weights from `from_pretrained(folder)`, offline) or
from a config (`AutoConfig.for_model(name, **kwargs)`, random weights). The token sequence
comes from the model's own embeddings, position embeddings interpolated to the input by the
model's own code; ViTMAE's random masking is switched off (mask ratio 0, patches in order).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixio.checkpoint import mismatch_message
from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.baselines.common import BaselineEncoder, BaselineError

log = logging.getLogger("pixio.baselines")

# encoder.name (the config's model_type) -> transformers class
FAMILIES = {
    "vit": "ViTModel",
    "vit_mae": "ViTMAEModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
}
# Weights a frozen encoder does not use: task heads, the MAE decoder, ViT's pooler.
IGNORED_PREFIXES = ("pooler.", "decoder.", "classifier.", "head.")


def _transformers() -> Any:
    """The transformers package (an optional dependency: only this source needs it)."""
    try:
        import transformers
    except ImportError:
        raise BaselineError(
            "source",
            "transformers baselines need the transformers package: pip install 'transformers>=5.0'",
        ) from None
    return transformers


def model_class(name: str) -> type[nn.Module]:
    """The transformers class of family `name`; BaselineError for another name."""
    if name not in FAMILIES:
        raise BaselineError(
            "name",
            f"unknown transformers model {name!r}: one of {', '.join(FAMILIES)} (the model_type of"
            " the folder's config.json)",
        )
    return getattr(_transformers(), FAMILIES[name])


def folder_family(folder: str | None) -> str | None:
    """The `model_type` of a local folder's config.json (None: no folder, no config.json, or
    none recorded); BaselineError naming the file when it does not parse."""
    path = Path(folder) / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BaselineError("checkpoint", f"{path}: cannot be read as JSON ({err})") from None
    model_type = saved.get("model_type") if isinstance(saved, dict) else None
    return model_type if isinstance(model_type, str) else None


def resolve_family(name: str | None, folder: str | None) -> str:
    """The family a folder is built as: `name` when given (None or "": not given), else the
    folder's config.json `model_type`, which must be one of FAMILIES. BaselineError otherwise,
    naming the model_type the folder records (so the fix is in the message)."""
    if name:
        if name not in FAMILIES:
            found = folder_family(folder)
            hint = (f"; {folder}/config.json says {found!r}: leave encoder.name out (or set "
                    f"encoder.name={found}) to use it") if found in FAMILIES else ""  # fmt: skip
            raise BaselineError("name", f"unknown transformers model {name!r}: one of {', '.join(FAMILIES)} (the model_type of the folder's config.json){hint}")  # fmt: skip
        return name
    found = folder_family(folder)
    if found is None:
        where = "no folder" if folder is None else f"{folder} has no config.json with a model_type"
        raise BaselineError("name", f"is needed: {where} to read the family from (one of {', '.join(FAMILIES)})")  # fmt: skip
    if found not in FAMILIES:
        raise BaselineError("checkpoint", f"{folder} holds a {found!r} model (config.json model_type), not one of {', '.join(FAMILIES)}")  # fmt: skip
    return found


def app_family(name: str, folder: str | None) -> str:
    """`encoder.name` of an evaluation app run on a transformers folder: a Pixio registry name
    (the apps' default, `pixio_vith16`, which names no transformers model) counts as not given,
    so the folder's config.json model_type decides (`resolve_family`)."""
    from pixio.models.registry import list_models

    return resolve_family(None if name in list_models() else name, folder)


def hf_config(name: str, folder: str | None, **kwargs: Any) -> Any:
    """The config of family `name`: the folder's config.json (which must be of that family) or
    the family's defaults, with `kwargs` given to the constructor; ViTMAE's masking off."""
    config_class = model_class(name).config_class
    unknown = [k for k in kwargs if not hasattr(config_class(), k)]
    if unknown:
        raise BaselineError("model_kwargs", f"{config_class.__name__} has no field {unknown[0]!r}")
    if folder is None:
        config = config_class(**kwargs)
    else:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise BaselineError(
                "checkpoint", f"{folder}: not a transformers model folder (no config.json)"
            )
        saved = json.loads(path.read_text())
        if saved.get("model_type") != name:
            raise BaselineError(
                "checkpoint",
                f"{folder} holds a {saved.get('model_type')!r} model, not {name!r} (encoder.name)",
            )
        config = config_class.from_dict({**saved, **kwargs})
    if name == "vit_mae":
        config.mask_ratio = 0.0  # every patch, in order (the noise in embed_tokens)
    return config


def _statistics(folder: str | None) -> tuple[list[float], list[float]]:
    """The image mean / std of the folder's preprocessor_config.json (ImageNet's otherwise)."""
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    pre = json.loads(path.read_text())
    return pre.get("image_mean", list(IMAGENET_MEAN)), pre.get("image_std", list(IMAGENET_STD))


class TransformersEncoder(BaselineEncoder):
    """`ViTModel`, `ViTMAEModel`, `Dinov2Model` or `Dinov2WithRegistersModel` as a
    FeatureEncoder: one class token, DINOv2's register tokens skipped."""

    source = "transformers"

    def __init__(
        self, model: nn.Module, name: str, folder: str | None, config_kwargs: dict[str, Any]
    ) -> None:
        super().__init__(model, name, *_statistics(folder))
        self.config_kwargs = dict(config_kwargs)  # applied again to the folder's config on read
        config = model.config
        self.patch_size = int(config.patch_size)
        self.embed_dim = int(config.hidden_size)
        self.n_cls_tokens = 1
        self.n_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)

    @property
    def blocks(self) -> nn.ModuleList:  # ViT / ViTMAE: model.layers; DINOv2: model.encoder.layer
        return self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer

    @property
    def norm(self) -> nn.Module:
        return self.model.layernorm

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.embeddings
        if self.name == "vit":
            return embeddings(x, interpolate_pos_encoding=True)
        if self.name == "vit_mae":  # ascending noise: the identity order, nothing masked
            h, w = self.patch_grid(x)
            # float32 whatever the images' dtype: bf16 has too few values for 324+ distinct ranks
            noise = torch.arange(h * w, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
            return embeddings(x, noise=noise, interpolate_pos_encoding=True)[0]
        return embeddings(x)  # DINOv2 always interpolates

    def read_state(self, checkpoint: str) -> dict[str, torch.Tensor]:
        """`from_pretrained(checkpoint)` offline, then strict: transformers initialises missing
        weights at random and skips mis-shaped ones, so both are errors here; weights of heads a
        frozen encoder does not use (the MAE decoder, ViT's pooler, classifiers) are dropped."""
        config = hf_config(self.name, checkpoint, **self.config_kwargs)
        with _quiet_transformers():  # its load report and progress bars; the outcome is below
            model, info = type(self.model).from_pretrained(
                checkpoint, config=config, local_files_only=True, output_loading_info=True,
                dtype=torch.float32, ignore_mismatched_sizes=True, **_init_kwargs(self.name),
            )  # fmt: skip
        unexpected = sorted(info.get("unexpected_keys", ()))
        problem = mismatch_message(checkpoint, {
            "missing keys": sorted(info.get("missing_keys", ())),
            "unexpected keys": [k for k in unexpected if not k.startswith(IGNORED_PREFIXES)],
            "other shapes": sorted(_shape_change(k) for k in info.get("mismatched_keys", ())),
        })  # fmt: skip
        if problem is not None:
            raise BaselineError("checkpoint", problem)
        if unexpected:
            log.info("%s: ignored %d weights of heads a frozen encoder does not use (%s)",
                     checkpoint, len(unexpected), ", ".join(sorted({k.split(".")[0] for k in unexpected})))  # fmt: skip
        return model.state_dict()


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the block, as they were after it."""
    logging_ = _transformers().utils.logging
    level, bars = logging_.get_verbosity(), logging_.is_progress_bar_enabled()
    logging_.set_verbosity_error()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        logging_.set_verbosity(level)
        if bars:
            logging_.enable_progress_bar()


def _shape_change(entry: Any) -> str:
    """A `mismatched_keys` entry of transformers' loading info: (key, file shape, model shape)."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, found, wanted = entry
        return f"{key} {tuple(found)} (the model's: {tuple(wanted)})"
    return str(entry)


def _init_kwargs(name: str) -> dict[str, Any]:
    return {"add_pooling_layer": False} if name == "vit" else {}


def build_transformers(
    name: str | None, folder: str | None = None, **kwargs: Any
) -> TransformersEncoder:
    """Family `name` (None: the folder's config.json model_type, `resolve_family`) with the
    architecture of `folder`'s config.json (or the family's default config), `kwargs` applied to
    the config; weights initialised by transformers."""
    name = resolve_family(name, folder)
    config = hf_config(name, folder, **kwargs)
    model = model_class(name)(config, **_init_kwargs(name))
    return TransformersEncoder(model.eval(), name, folder, kwargs)
