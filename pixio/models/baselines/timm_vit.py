"""timm vision transformers, hybrids (a ResNet stem feeding the ViT) included, behind Pixio's
feature API.

Built by name with `pretrained=False` (timm never downloads here), without a classifier and
with `dynamic_img_size=True`, so the position table is resampled to any input by timm's own
code. Weights come from a local file (`.safetensors`, `.pth`/`.bin`, a training checkpoint with
a `model` / `state_dict` entry), read without unpickling code and passed through timm's own
checkpoint filter (original-format conversions, position-table resampling).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.baselines.common import BaselineEncoder, BaselineError

log = logging.getLogger("pixio.baselines")

IGNORED_PREFIXES = ("head.", "head_drop.")  # the classifier: a frozen encoder has none
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def check_timm_name(name: str) -> None:
    """BaselineError naming close matches when timm has no model `name`."""
    base = name.split(".")[0]  # a pretrained tag (".mae", ".augreg_in21k") picks the default cfg
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models("vit*"), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise BaselineError("name", f"unknown timm model {name!r}{hint}")


class TimmEncoder(BaselineEncoder):
    """A timm `VisionTransformer` as a FeatureEncoder: its class token, registers skipped."""

    source = "timm"

    def __init__(self, model: VisionTransformer, name: str) -> None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(model, name, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        self.patch_size = int(model.patch_embed.feat_ratio())  # a hybrid's: stem stride x patch
        self.embed_dim = int(model.embed_dim)
        self.n_cls_tokens = 1
        self.n_register_tokens = int(model.num_reg_tokens)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    @property
    def norm(self) -> nn.Module:
        # With `fc_norm` (pooled-feature norm) timm's final `norm` is an identity; the pooled
        # norm is per token, so it is the final norm of the tokens too.
        m = self.model
        return m.fc_norm if isinstance(m.norm, nn.Identity) else m.norm

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
        return m.norm_pre(m.patch_drop(m._pos_embed(x)))  # timm's own position handling

    def read_state(self, checkpoint: str) -> dict[str, torch.Tensor]:
        """The weights file's state dict through timm's own filter (original-format
        conversions, position-table resampling), without the classifier. The strict check
        against the model is the caller's (`pixio.checkpoint.broadcast_checked_state`)."""
        from pixio.checkpoint import read_raw_state

        path = weight_file(checkpoint)
        state = checkpoint_filter_fn(read_raw_state(path), self.model)
        expected = self.model.state_dict()
        ignored = [k for k in state if k not in expected and k.startswith(IGNORED_PREFIXES)]
        if ignored:
            log.info("%s: ignored the classifier's %d weights", path, len(ignored))
        return {k: v for k, v in state.items() if k not in ignored}


def weight_file(checkpoint: str | Path) -> Path:
    """The weights file of `checkpoint`: itself, or the one weights file of a folder."""
    path = Path(checkpoint)
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise BaselineError(
                "checkpoint", f"{path}: no weights file ({', '.join(WEIGHT_FILES)}) in this folder"
            )
        return found[0]
    return path


def build_timm(name: str, **kwargs: Any) -> TimmEncoder:
    """timm model `name` (no classifier, any input size) as a TimmEncoder; `kwargs` go to
    `timm.create_model` (e.g. `img_size` of the checkpoint's position table, tiny test sizes)."""
    check_timm_name(name)
    args = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    try:
        model = timm.create_model(name, pretrained=False, **args)
    except TypeError as err:  # an argument the model does not take: ours (not a ViT) or the user's
        raise _create_error(name, kwargs, err) from None
    if not isinstance(model, VisionTransformer):
        raise BaselineError(
            "name",
            f"timm model {name!r} is a {type(model).__name__}, not a VisionTransformer (plain or"
            " hybrid): the feature API needs its class token and blocks",
        )
    if model.cls_token is None:
        raise BaselineError(
            "name", f"timm model {name!r} has no class token: the heads and k-NN read it"
        )
    return TimmEncoder(model.eval(), name)


def _create_error(name: str, kwargs: dict[str, Any], err: TypeError) -> BaselineError:
    """Which field is at fault when `create_model` refuses an argument. Built again with the
    user's arguments alone: if that fails too, `model_kwargs`; if it works, the model refused
    our ViT arguments, so `name` (not a VisionTransformer)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **kwargs)
    except TypeError:
        return BaselineError("model_kwargs", f"timm model {name!r} does not take these arguments: {err}")  # fmt: skip
    return BaselineError(
        "name", f"timm model {name!r} is not a VisionTransformer (plain or hybrid): {err}"
    )
