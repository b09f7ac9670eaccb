"""Pixio encoders in timm's model registry (`import pixio` registers them).

    import pixio, timm
    model = timm.create_model("pixio_vith16", pretrained=True,
                              pretrained_cfg_overlay={"file": "pixio_vith16.pth"})

Every registry size is a timm model name. The model is a `PixioTimmEncoder`: the one
`PixioEncoder` (same weights, same state-dict keys, same feature API `model.features(x,
block_ids)`) with timm's model methods added. `pretrained=True` reads the `file` (or `state_dict`)
of the resolved `pretrained_cfg` with Pixio's own reader: `weights_only`, and every format
`pixio.load_encoder` reads (`.pth`, `.safetensors`, a training checkpoint directory, a Hugging
Face Pixio folder); `checkpoint_module=` picks the trained module of a training checkpoint.
Nothing is downloaded: without a local file `pretrained=True` is an error. A file that records
its architecture (every `.safetensors` file Pixio writes) sets the sizes: `depth=`, `img_size=`
... are then not needed, and a value that disagrees is refused in one line naming it.

timm's `import` is already paid by `import pixio` (the encoder is built from timm layers), so
registering costs a few function definitions.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import resolve_pretrained_cfg as timm_resolve_pretrained_cfg
from torch import nn

from pixio.architecture import resolve
from pixio.checkpoint import encoder_state, read_architecture, read_state_dict
from pixio.constants import DEFAULT_IMG_SIZE, IMAGENET_MEAN, IMAGENET_STD
from pixio.hub import load_checked
from pixio.models.encoder import PixioEncoder
from pixio.models.registry import ENCODER_SIZES, encoder_kwargs

POOLS = ("token", "avg", "")  # mean of the class tokens (Pixio's embedding), of the patches, none
OUTPUT_FMTS = ("NCHW", "NLC")


def take_indices(depth: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's block selection: None -> all, an int n -> the last n, a sequence -> those blocks
    (negative from the end). ValueError when out of range."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"last-n {indices} is out of range (1 to {depth})")
        return list(range(depth - indices, depth))
    out = []
    for i in indices:
        if not -depth <= i < depth:
            raise ValueError(f"block index {i} out of range for an encoder of depth {depth}")
        out.append(i % depth)
    return out


class PixioTimmEncoder(PixioEncoder):
    """A `PixioEncoder` with timm's model interface: `forward` (features -> pool -> head),
    `forward_features`, `forward_head`, `forward_intermediates`, `reset_classifier`,
    `get_classifier`, `prune_intermediate_layers`, and the attributes timm's helpers read
    (`num_features`, `num_classes`, `global_pool`, `num_prefix_tokens`, `feature_info`,
    `pretrained_cfg`). Any H, W divisible by the patch is accepted (timm's `dynamic_img_size`).

    Pooling (`global_pool`): "token" is the mean of the 8 normed class tokens (Pixio's global
    embedding), "avg" the mean of the normed patch tokens, "" none. The head is an identity for
    `num_classes=0` (the default: a frozen backbone), else a linear layer (`head.*`)."""

    def __init__(
        self,
        num_classes: int = 0,
        global_pool: str = "token",
        in_chans: int = 3,
        dynamic_img_size: bool = True,
        **encoder_args: Any,
    ) -> None:
        if in_chans != 3:
            raise ValueError(
                f"Pixio encoders take RGB images (in_chans=3), got in_chans={in_chans}"
            )
        if not dynamic_img_size:
            raise ValueError(
                "dynamic_img_size=False is not offered: Pixio encoders always resize their "
                "position table to the input (any H, W divisible by the patch size)"
            )
        super().__init__(**encoder_args)
        self.num_features = self.head_hidden_size = self.embed_dim
        self.num_prefix_tokens = self.n_cls_tokens
        self.has_class_token = True
        self.dynamic_img_size = True
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=self.patch_size)
            for i in range(self.depth)
        ]
        self.num_classes, self.global_pool = 0, "token"
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` (0: identity); `global_pool` one of POOLS."""
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f"global_pool {global_pool!r}: Pixio offers {POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.cls_token  # the new head follows the model's device and dtype
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normed tokens of the last block (B, n_cls + h*w, D)."""
        last = self.features(x, [-1])[0]
        return torch.cat([last["cls_tokens_norm"], last["patch_tokens_norm"]], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, n_cls + h*w, D) -> pooled (B, D) (or the tokens, pool "") -> head."""
        n = self.n_cls_tokens
        if self.global_pool == "token":
            x = x[:, :n].mean(dim=1)
        elif self.global_pool == "avg":
            x = x[:, n:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """timm's forward: `forward_head(forward_features(x))`. The reference feature API stays
        available as `features(x, block_ids)`."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """timm's intermediate features from one pass: per block of `indices` (see take_indices)
        its patch tokens, (B, D, h, w) for "NCHW" or (B, h*w, D) for "NLC", final-normed if
        `norm`; with `return_prefix_tokens`, (patches, class tokens (B, n_cls, D)) pairs. Also
        returns `forward_features(x)` first unless `intermediates_only`. Blocks after the last
        one needed are never run (`stop_early` changes nothing)."""
        if output_fmt not in OUTPUT_FMTS:
            raise ValueError(f"output_fmt {output_fmt!r}: one of {OUTPUT_FMTS}")
        take = take_indices(self.depth, indices)
        h, w = self.patch_grid(x)
        run = take if intermediates_only else [*take, self.depth - 1]
        feats = dict(zip(run, self.features(x, run), strict=True))
        suffix = "_norm" if norm else ""
        out: list[Any] = []
        for i in take:
            patches = feats[i]["patch_tokens" + suffix]  # (B, h*w, D)
            if output_fmt == "NCHW":
                patches = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w).contiguous()
            out.append(
                (patches, feats[i]["cls_tokens" + suffix]) if return_prefix_tokens else patches
            )
        if intermediates_only:
            return out
        last = feats[self.depth - 1]
        return torch.cat([last["cls_tokens_norm"], last["patch_tokens_norm"]], dim=1), out

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / the head if asked),
        as timm's `features_only=True` does; returns the kept indices, non-negative."""
        take = take_indices(self.depth, indices)
        self.blocks = self.blocks[: max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of encoder `name`: the reference preprocessing (256x256 RGB,
    bicubic, no crop margin, ImageNet mean/std), no classifier, no weight location."""
    return dict(
        input_size=(3, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE),
        interpolation="bicubic",
        crop_pct=1.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=0,
        fixed_input_size=False,
        first_conv="patch_embed.proj",
        classifier="head",
        paper_name="In Pursuit of Pixel Supervision for Visual Pre-training",
    )


default_cfgs = generate_default_cfgs({name: pretrained_cfg(name) for name in ENCODER_SIZES})


def _weights(name: str, cfg: Any, overlay: dict[str, Any] | None) -> Any:
    """The local weight source of the resolved pretrained config: a state dict or a path."""
    resolved = timm_resolve_pretrained_cfg(name, pretrained_cfg=cfg, pretrained_cfg_overlay=overlay)
    if resolved.state_dict is not None:
        return resolved.state_dict
    if resolved.file:
        return Path(resolved.file).expanduser()
    raise ValueError(
        f"{name}: pretrained=True needs local weights, e.g. "
        "pretrained_cfg_overlay={'file': 'pixio_vith16.pth'} (Pixio's timm models download nothing)"
    )


def _load(model: PixioTimmEncoder, weights: Any, module: str | None) -> None:
    """Strict load of the encoder's weights (one line naming mismatched keys)."""
    if isinstance(weights, dict):
        source, state = "pretrained_cfg['state_dict']", encoder_state(weights)
    else:
        source = str(weights) if module is None else f"{weights} (module {module!r})"
        state = encoder_state(read_state_dict(weights, module))
    load_checked(model, state, source)


def _build(
    name: str, weights: Any, module: str | None, num_classes: int = 0, **kwargs: Any
) -> PixioTimmEncoder:
    """Build, load the weights (before any classifier exists), then add the head."""
    timm_args = {
        k: kwargs.pop(k) for k in ("global_pool", "in_chans", "dynamic_img_size") if k in kwargs
    }
    if weights is not None and not isinstance(weights, dict):  # a file records its sizes
        source = str(weights) if module is None else f"{weights} (module {module!r})"
        arch = read_architecture(weights, module, run_config=False)  # timm names the model
        name, kwargs = resolve(arch, name, kwargs, source)
    model = PixioTimmEncoder(**timm_args, **encoder_kwargs(name, **kwargs))
    if weights is not None:
        _load(model, weights, module)
    if num_classes:
        model.reset_classifier(num_classes)
    return model


def create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's entry point of encoder `name` (see the module docstring). Model arguments: the
    `build_encoder` overrides (`depth`, `img_size`, `drop_path` or timm's `drop_path_rate`, ...),
    `num_classes`, `global_pool`, `checkpoint_module`, timm's `features_only` / `out_indices`."""
    cfg, overlay = kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)  # nothing is downloaded, so nothing is cached
    module = kwargs.pop("checkpoint_module", None)
    if "drop_path_rate" in kwargs:
        kwargs["drop_path"] = kwargs.pop("drop_path_rate")
    weights = _weights(name, cfg, overlay) if pretrained else None
    return build_model_with_cfg(
        partial(_build, name, weights, module), name, pretrained=False, pretrained_cfg=cfg,
        pretrained_cfg_overlay=overlay, feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )  # fmt: skip


def _register(name: str) -> None:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Pixio encoder {name} (pixio.timm_models.create)."
    register_model(entry)


for _name in ENCODER_SIZES:
    _register(_name)
