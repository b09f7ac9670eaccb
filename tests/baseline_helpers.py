"""Tiny random baselines of every supported family, built and saved locally (no downloads):
transformers folders (`save_pretrained`) and timm weight files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pixio.models.baselines import build_baseline

# Depth 4: the DPT head reads 4 blocks. Patch 14 (ViT-H/14-like) for the transformers models.
_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
_DINO = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2)
TINY_HF: dict[str, dict[str, Any]] = {
    "vit": {**_VIT, "image_size": 56, "patch_size": 14},
    "vit_mae": {**_VIT, "image_size": 56, "patch_size": 14},
    "dinov2": {**_DINO, "image_size": 56, "patch_size": 14},
    "dinov2_with_registers": {
        **_DINO,
        "image_size": 56,
        "patch_size": 14,
        "num_register_tokens": 2,
    },  # fmt: skip
}
# A plain timm ViT with register tokens, and the hybrid: ResNet-50 (BiT) stem, stride 16.
TINY_TIMM: dict[str, dict[str, Any]] = {
    "vit_base_patch16_224": dict(embed_dim=32, depth=4, num_heads=2, img_size=64, reg_tokens=2),
    "vit_base_r50_s16_224": dict(embed_dim=32, depth=4, num_heads=2, img_size=64),
}


def tiny_hf(name: str, seed: int = 0, **overrides: Any):
    """A random tiny transformers baseline adapter of family `name`."""
    torch.manual_seed(seed)
    return build_baseline("transformers", name, **{**TINY_HF[name], **overrides}).eval()


def save_hf_folder(name: str, folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny random model of family `name` saved with `save_pretrained` (config + safetensors)."""
    tiny_hf(name, seed, **overrides).model.save_pretrained(folder)
    return folder


def tiny_timm(name: str, seed: int = 0, **overrides: Any):
    """A random tiny timm baseline adapter."""
    torch.manual_seed(seed)
    return build_baseline("timm", name, **{**TINY_TIMM[name], **overrides}).eval()


def save_timm_weights(name: str, path: Path, seed: int = 0, num_classes: int = 0) -> Path:
    """A tiny random timm model's weights as a plain .pth state dict (with a classifier of
    `num_classes` when > 0, as timm's released checkpoints have)."""
    import timm

    torch.manual_seed(seed)
    kwargs = {**TINY_TIMM[name], "num_classes": num_classes}
    model = timm.create_model(name, pretrained=False, dynamic_img_size=True, **kwargs)
    torch.save(model.state_dict(), path)
    return path
