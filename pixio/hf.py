"""Hugging Face `transformers` Pixio format: key mapping and folder export.

Writing the folder needs only `safetensors` (no `transformers` import), so an exported folder can be
produced anywhere. It loads as `transformers.PixioModel.from_pretrained(folder)` and as the
backbone `transformers.PixioBackbone.from_pretrained(folder, out_indices=[...])`.

Layout of `model.safetensors`: the encoder under `PixioBackbone`'s names, `pixio.` + the
`PixioModel` names (`pixio.embeddings.*`, `pixio.layers.{i}.*`, `pixio.layernorm.*`), plus a copy
of the final norm as the backbone's own `layernorm.*`, which it applies to every feature map.
`PixioModel` strips the `pixio.` prefix when it loads the file. With `PixioModel` names only (no
prefix), the backbone would leave its `layernorm` at its initial value (weight 1, bias 0) and its
feature maps would differ from the encoder's normed tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.encoder import PixioEncoder

# Our key pattern -> HF key pattern (the qkv projection is handled separately: HF splits it).
_RENAMES: list[tuple[str, str]] = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"^norm\.", "layernorm."),
]
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_HF_QKV = re.compile(r"^layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(f"no Hugging Face Pixio equivalent for key {key!r}")


def pixio_to_hf_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder state dict (reference names) -> transformers `PixioModel` names."""
    out = {}
    for key, value in sd.items():
        m = _QKV.match(key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"layers.{m[1]}.attention.{name}_proj.{m[2]}"] = part.contiguous()
        else:
            out[_rename(key, _RENAMES)] = value.contiguous()
    return out


_REVERSE = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^layernorm\.", "norm."),
]


BACKBONE_PREFIX = "pixio."  # PixioBackbone holds the PixioModel under `pixio`
BACKBONE_NORM = "layernorm."  # the backbone's own norm of its feature maps


def to_backbone_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`PixioModel` names -> `PixioBackbone` names: `pixio.` prefix, and the final norm copied
    to the backbone's feature-map norm `layernorm.*` (a copy: safetensors refuses shared memory)."""
    out = {BACKBONE_PREFIX + k: v for k, v in hf_state.items()}
    for key, value in hf_state.items():
        if key.startswith(BACKBONE_NORM):
            out[key] = value.clone()
    return out


def hf_to_pixio_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `PixioModel` names (optionally prefixed `pixio.`, as in `PixioBackbone`) ->
    reference names. With the prefix, the unprefixed `layernorm.*` is the backbone's feature-map
    norm, not the encoder's final norm (`pixio.layernorm.*`), and is left out."""
    if any(k.startswith(BACKBONE_PREFIX) for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith(BACKBONE_NORM)}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        key = key.removeprefix(BACKBONE_PREFIX)
        m = _HF_QKV.match(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif key != "embeddings.mask_token":
            out[_rename(key, _REVERSE)] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {block}: incomplete q/k/v {kind} (found {sorted(parts)})")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[c] for c in "qkv"], dim=0)
    return out


def hf_config(encoder: PixioEncoder) -> dict:
    """config.json content for `transformers.PixioConfig` describing this encoder."""
    gh, gw = encoder.grid_size
    if gh != gw:
        raise ValueError(f"transformers' Pixio needs a square position grid, got {gh}x{gw}")
    blk = encoder.blocks[0]
    return {
        "architectures": ["PixioModel"],
        "model_type": "pixio",
        "hidden_size": encoder.embed_dim,
        "num_hidden_layers": encoder.depth,
        "num_attention_heads": blk.attn.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features // encoder.embed_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": encoder.norm.eps,
        "image_size": gh * encoder.patch_size,
        "patch_size": encoder.patch_size,
        "num_channels": encoder.patch_embed.proj.in_channels,
        "qkv_bias": True,
        "n_cls_tokens": encoder.n_cls_tokens,
        "dtype": "float32",
    }


def image_processor_config(size: int) -> dict:
    """Preprocessing of the reference: resize to size x size bicubic, [0, 1], ImageNet mean/std."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def export_hf(encoder: PixioEncoder, out_dir: str | Path) -> Path:
    """Write a folder that `transformers.PixioModel.from_pretrained(out_dir)` and
    `transformers.PixioBackbone.from_pretrained(out_dir, out_indices=[...])` load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(encoder)
    state = {k: v.detach().float().cpu() for k, v in encoder.state_dict().items()}
    hf_state = to_backbone_layout(pixio_to_hf_state(state))
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = image_processor_config(config["image_size"])
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out
