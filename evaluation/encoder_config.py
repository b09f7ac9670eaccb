"""The `encoder` config group every evaluation app shares (`EncoderConfig`) and its checks, in a
module that loads no torch: an app's `--help`, `--cfg job` and config errors return before any
model library is imported.

Only two checks need torch, and import it when they run: a checkpoint file's recorded
architecture (`pixio_build`: read from the file's header) and a baseline's patch size (a meta-
device build of the baseline). Building the encoder itself is `evaluation.features`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.results import PIXIO
from pixio.models.registry import encoder_kwargs, list_models
from pixio.runtime.choices import ENCODER_SOURCES
from pixio.runtime.config import ConfigError, check_choice, require, require_set

log = logging.getLogger("pixio.eval")

# What a resume may not change about the frozen encoder (its file: by digest, ENCODER_FILE).
ENCODER_SHAPE_KEYS = (
    "encoder.source", "encoder.name", "encoder.module", "encoder.model_kwargs",
    "encoder.embed_dim", "encoder.depth", "encoder.num_heads", "encoder.n_cls_tokens",
)  # fmt: skip
ENCODER_FILE = {"encoder.sha256": "encoder.checkpoint"}  # same file (digest) on resume

REFERENCE_SIDE = 256  # the protocol's crop and window side for patch 16 (docs/reproduction.md)


@dataclass
class EncoderConfig:
    source: str = "pixio"  # pixio | transformers | timm (baselines: docs/evaluation.md, Baselines)
    # pixio: registry name; transformers: vit | vit_mae | dinov2 | dinov2_with_registers (the
    # folder's model_type); timm: a ViT's model name (hybrids included)
    name: str = "pixio_vith16"
    # pixio: .pth / .safetensors / training checkpoint dir / HF folder; transformers: a
    # from_pretrained folder; timm: a weights file, or a folder holding one
    checkpoint: str | None = None
    module: str | None = None  # pixio: trained module of a multi-module training checkpoint
    # pixio: sizes for a checkpoint that does not record its architecture (every .safetensors
    # file Pixio writes and a training checkpoint directory do: set, they must agree with it)
    img_size: int | None = None  # pixio, timm: position-table size the checkpoint was trained at
    embed_dim: int | None = None  # pixio: override the registry width (small demo/test encoders)
    depth: int | None = None  # pixio: override the registry depth
    num_heads: int | None = None  # pixio: override the registry head count
    n_cls_tokens: int | None = None  # pixio: override the class-token count (None: 8)
    # baselines: transformers config fields / timm.create_model arguments (e.g. tiny test sizes)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    random_if_missing: bool = False  # demo only: a missing checkpoint gives random weights (logged)


PIXIO_ONLY = ("module", "embed_dim", "depth", "num_heads", "n_cls_tokens")


def reference_side(patch: int) -> int:
    """The crop / window side for an encoder of this patch size: 256, or the largest multiple of
    the patch up to 256 (patch 14: 252), so the image tiles into whole patches."""
    return REFERENCE_SIDE // patch * patch


def check_side(value: int | None, key: str, patch: int) -> None:
    """A crop or window side, when given: a positive multiple of the encoder's patch size."""
    if value is not None:
        require(value > 0 and value % patch == 0, key, f"{value} is not a positive multiple of the encoder's patch size {patch} (null picks {reference_side(patch)})")  # fmt: skip


def encoder_overrides(cfg: Any) -> dict[str, Any]:
    """The registry overrides that are set in an `encoder` config node."""
    keys = ("img_size", "embed_dim", "depth", "num_heads", "n_cls_tokens")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def baseline_kwargs(cfg: Any) -> dict[str, Any]:
    """What a baseline is built with: `model_kwargs`, and timm's `img_size` when set."""
    kwargs = dict(cfg.get("model_kwargs") or {})
    if cfg.get("img_size") is not None:
        kwargs["img_size"] = cfg.img_size
    return kwargs


def has_checkpoint(cfg: Any) -> bool:
    """Whether an `encoder` node's checkpoint is set and exists."""
    return cfg.checkpoint is not None and Path(cfg.checkpoint).exists()


def pixio_build(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(registry name, build overrides) of a Pixio `encoder` node: the architecture its
    checkpoint records (every `.safetensors` file Pixio writes), checked against `name` and the
    size keys that are set (ConfigError naming the differing sizes); else `name` and those keys
    (a training checkpoint directory's tensors name any differing size when they are read)."""
    overrides = encoder_overrides(cfg)
    if not has_checkpoint(cfg):
        return cfg.name, overrides
    from pixio.architecture import ArchitectureError, resolve  # torch: the file's reader
    from pixio.checkpoint import read_architecture

    try:
        arch = read_architecture(cfg.checkpoint, cfg.get("module"), run_config=False)
        return resolve(arch, cfg.name, overrides, cfg.checkpoint)
    except (ArchitectureError, ValueError) as err:  # a record that disagrees; an unreadable file
        raise ConfigError(f"encoder.checkpoint: {err}") from None


def encoder_patch_size(cfg: Any) -> int:
    """The patch grid's stride of an `encoder` node's model (a hybrid's: stem stride x patch);
    a baseline's from its meta-device build (BaselineError naming the key at fault)."""
    if cfg.get("source", PIXIO) == PIXIO:
        name, overrides = pixio_build(cfg)
        return encoder_kwargs(name, **overrides)["patch_size"]
    from evaluation.features import build_meta_encoder  # torch and the baseline's library

    return build_meta_encoder(cfg).patch_size


def check_encoder(cfg: Any) -> int:
    """The `encoder` group: a known source and model, an existing checkpoint that the model's
    family accepts (ConfigError naming the key otherwise). Returns the model's patch size."""
    require_set(cfg, "encoder.name")
    e = cfg.encoder
    if e.source == PIXIO:
        require(e.name in list_models(), "encoder.name", f"unknown model {e.name!r}; known: {', '.join(list_models())}")  # fmt: skip
        require(not e.model_kwargs, "encoder.model_kwargs", "applies to baselines (encoder.source=transformers|timm); a Pixio encoder takes embed_dim, depth, num_heads, n_cls_tokens")  # fmt: skip
    else:
        _check_baseline_keys(e)
    if not (e.random_if_missing and not has_checkpoint(e)):
        require(e.checkpoint is not None, "encoder.checkpoint", "is required (a frozen evaluation of random weights says nothing)")  # fmt: skip
        require(Path(e.checkpoint).exists(), "encoder.checkpoint", f"not found: {e.checkpoint}")
    if e.source == PIXIO:
        return encoder_patch_size(e)
    require(not (e.img_size is not None and "img_size" in (e.model_kwargs or {})), "encoder.img_size", "is also set in encoder.model_kwargs.img_size: set one")  # fmt: skip
    from pixio.models.baselines import BaselineError

    try:  # the meta build checks the name, the folder's family and the arguments
        return encoder_patch_size(e)
    except BaselineError as err:
        raise ConfigError(f"encoder.{err.key}: {err}") from None


def _check_baseline_keys(e: Any) -> None:
    """A baseline's `encoder` node: a known source, and none of the keys that only Pixio
    encoders read."""
    check_choice(e, "encoder", "source", ENCODER_SOURCES)
    for key in PIXIO_ONLY:
        require(e.get(key) is None, f"encoder.{key}", f"applies to encoder.source=pixio only; a {e.source} baseline's architecture comes from its checkpoint and encoder.model_kwargs")  # fmt: skip
    require(not (e.source == "transformers" and e.img_size is not None), "encoder.img_size", "a transformers folder's config.json sets image_size (or encoder.model_kwargs.image_size)")  # fmt: skip


def check_random_weights(cfg: Any) -> None:
    """Random weights (`encoder.random_if_missing` without a checkpoint) are for the demo
    experiments only, which build their own data (`data.build_demo`); anywhere else a missing
    checkpoint is a ConfigError naming it, so a typo never evaluates random weights."""
    e = cfg.encoder
    if e.random_if_missing and not has_checkpoint(e):
        found = "is null" if e.checkpoint is None else f"not found: {e.checkpoint}"
        require(cfg.data.build_demo, "encoder.checkpoint", f"{found} (random weights, encoder.random_if_missing, are for the demo experiments only, which set data.build_demo=true)")  # fmt: skip


def resolve_encoder_name(cfg: Any) -> None:
    """A transformers folder without `encoder.name` (the apps' default is a Pixio name): the
    family is the folder's config.json model_type, written into encoder.name (so logs, config.yaml
    and results.json name it); ConfigError naming the key when it cannot be read."""
    e = cfg.encoder
    if e.source != "transformers" or e.checkpoint is None or not Path(e.checkpoint).is_dir():
        return
    from pixio.models.baselines import BaselineError  # torch: the transformers adapter
    from pixio.models.baselines.transformers_vit import app_family

    try:
        family = app_family(e.name, e.checkpoint)
    except BaselineError as err:
        raise ConfigError(f"encoder.{err.key}: {err}") from None
    if family != e.name:
        log.info("encoder.name: %s (the model_type of %s/config.json)", family, e.checkpoint)
        e.name = family
