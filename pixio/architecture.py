"""The architecture a weight file carries: what builds the model its tensors fit.

Every `.safetensors` file Pixio writes (`save_encoder`, `save_mae`, `python -m pixio.convert`,
pre-training's `encoder.safetensors`, distillation's student exports) records it in the file's
metadata (string -> string, next to safetensors' own `format`):

    pixio.format       "1" (the version of this layout)
    pixio.kind         "encoder" or "mae" (encoder + decoder: the full pre-training model)
    pixio.name         registry name, e.g. "pixio_vith16" (absent when no registry size fits)
    pixio.embed_dim, pixio.depth, pixio.num_heads, pixio.mlp_ratio, pixio.patch_size,
    pixio.n_cls_tokens, pixio.img_size ("256", or "HxW" for a non-square position table)
    mae only: pixio.decoder_embed_dim, pixio.decoder_depth, pixio.decoder_num_heads,
    pixio.mask_grid, pixio.norm_pix_loss ("true" / "false")

A training checkpoint directory carries it too, in the run's config saved in its `meta.pt`
(pre-training's `model` group for the module `mae`; distillation's `students` for a
`student_<name>` module). A reader (`resolve`) builds from it; a name or a size override that
disagrees is refused in one line naming each differing size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pixio.constants import DEFAULT_PATCH_SIZE
from pixio.models.registry import ENCODER_SIZES, encoder_kwargs

FORMAT_VERSION = 1
PREFIX = "pixio."
KINDS = ("encoder", "mae")
# field -> type, in the order they are written and reported
ENCODER_FIELDS: dict[str, type] = {
    "embed_dim": int, "depth": int, "num_heads": int, "mlp_ratio": float, "patch_size": int,
    "n_cls_tokens": int, "img_size": tuple,
}  # fmt: skip
DECODER_FIELDS: dict[str, type] = {
    "decoder_embed_dim": int, "decoder_depth": int, "decoder_num_heads": int, "mask_grid": int,
    "norm_pix_loss": bool,
}  # fmt: skip
REGISTRY_MLP_RATIO = 4.0  # what build_encoder builds (the registry has no mlp_ratio override)


class ArchitectureError(ValueError):
    """A file's architecture that is malformed, or that disagrees with what was asked."""


def registry_name(embed_dim: int, num_heads: int) -> str | None:
    """The registry size of this width and head count (each pair is unique), or None."""
    for name, (dim, _, heads) in ENCODER_SIZES.items():
        if (dim, heads) == (embed_dim, num_heads):
            return name
    return None


def model_architecture(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The architecture of a built Pixio encoder, student or MAE (any device, meta included).
    `name`: its registry name (None: the registry size of its width and heads, if any)."""
    block = model.blocks[0]
    grid = tuple(int(s) for s in model.patch_embed.img_size)  # (H, W) of the position table
    arch: dict[str, Any] = {
        "kind": "mae" if hasattr(model, "decoder_blocks") else "encoder",
        "embed_dim": model.embed_dim, "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "patch_size": model.patch_size, "n_cls_tokens": model.n_cls_tokens, "img_size": grid,
    }  # fmt: skip
    if arch["kind"] == "mae":
        arch |= {
            "decoder_embed_dim": model.decoder_embed.out_features,
            "decoder_depth": len(model.decoder_blocks),
            "decoder_num_heads": model.decoder_blocks[0].attn.num_heads,
            "mask_grid": model.mask_grid, "norm_pix_loss": bool(model.norm_pix_loss),
        }  # fmt: skip
    arch["name"] = name or registry_name(arch["embed_dim"], arch["num_heads"])
    return arch


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"
    return str(value)


def to_metadata(arch: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata (string -> string) of an architecture."""
    fields = ENCODER_FIELDS | (DECODER_FIELDS if arch["kind"] == "mae" else {})
    meta = {"format": str(FORMAT_VERSION), "kind": arch["kind"]}
    if arch.get("name"):
        meta["name"] = arch["name"]
    meta |= {key: _text(arch[key]) for key in fields}
    return {PREFIX + k: v for k, v in meta.items()}


def _parse(key: str, kind: type, text: str) -> Any:
    if kind is bool:
        if text not in ("true", "false"):
            raise ValueError(text)
        return text == "true"
    if kind is tuple:
        sides = [int(s) for s in text.split("x")]
        if len(sides) not in (1, 2):
            raise ValueError(text)
        return (sides[0], sides[-1])
    return kind(text)


def from_metadata(meta: dict[str, str] | None, source: str | Path) -> dict[str, Any] | None:
    """The architecture in a file's metadata; None when it carries none (a file written by
    another tool, or before this format). ArchitectureError naming the file and the key for a
    malformed value or a newer format."""
    meta = meta or {}
    if PREFIX + "format" not in meta:
        return None
    version, kind = meta[PREFIX + "format"], meta.get(PREFIX + "kind")
    if version != str(FORMAT_VERSION):
        raise ArchitectureError(
            f"{source}: metadata format {version!r}; this version of Pixio reads {FORMAT_VERSION}"
        )
    if kind not in KINDS:
        raise ArchitectureError(f"{source}: metadata {PREFIX}kind {kind!r}; expected one of {KINDS}")  # fmt: skip
    arch: dict[str, Any] = {"kind": kind, "name": meta.get(PREFIX + "name")}
    for key, typ in (ENCODER_FIELDS | (DECODER_FIELDS if kind == "mae" else {})).items():
        text = meta.get(PREFIX + key)
        try:
            arch[key] = _parse(key, typ, text) if text is not None else None
        except ValueError:
            raise ArchitectureError(f"{source}: metadata {PREFIX}{key} {text!r} is not a valid {typ.__name__}") from None  # fmt: skip
        if arch[key] is None:
            raise ArchitectureError(f"{source}: metadata lacks {PREFIX}{key}")
    return arch


def describe(arch: dict[str, Any]) -> str:
    """A short summary: `pixio_vitt16 (embed_dim 192, depth 6, num_heads 3, img_size 128)`."""
    keys = ("embed_dim", "depth", "num_heads", "img_size")
    sizes = ", ".join(f"{k} {_text(arch[k])}" for k in keys)
    return f"{arch.get('name') or 'a Pixio'} {arch['kind']} ({sizes})"


def _as_size(key: str, value: Any) -> Any:
    """An override in the file's terms: img_size as (H, W), mlp_ratio as a float."""
    if key == "img_size":
        return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    return float(value) if key == "mlp_ratio" else value


def _size_fields(kind: str) -> list[str]:
    """The fields a build takes (mlp_ratio is fixed by the registry)."""
    fields = list(ENCODER_FIELDS) + (list(DECODER_FIELDS) if kind == "mae" else [])
    return [k for k in fields if k != "mlp_ratio"]


def _asked_sizes(
    arch: dict[str, Any], name: str | None, overrides: dict[str, Any]
) -> dict[str, Any]:
    """What the caller asked for, in the file's terms: the explicit overrides, plus the
    registry's sizes of `name` when it names another model than the file's."""
    asked = {k: _as_size(k, v) for k, v in overrides.items() if k in arch}
    if name is not None and arch.get("name") and name != arch["name"]:
        registry = encoder_kwargs(name, **{k: v for k, v in overrides.items() if k in ENCODER_FIELDS})  # fmt: skip
        asked = {k: _as_size(k, registry[k]) for k in ENCODER_FIELDS if k in registry} | asked
    return asked


def resolve(
    arch: dict[str, Any] | None,
    name: str | None,
    overrides: dict[str, Any],
    source: str | Path,
    kind: str = "encoder",
) -> tuple[str, dict[str, Any]]:
    """(registry name, build overrides) for the model of a file with architecture `arch`.
    Without one, `name` and `overrides` as given (ArchitectureError when `name` is None). With
    one, its sizes; a `name` or size override that disagrees raises ArchitectureError in one
    line naming each differing size (non-size overrides such as drop_path pass through)."""
    if arch is None:
        if name is None:
            raise ArchitectureError(
                f"{source} does not record its architecture (a file from another tool, or saved "
                "before Pixio wrote it): name the model, e.g. pixio_vith16, and its size overrides"
            )
        return name, dict(overrides)
    sizes = {k: arch[k] for k in _size_fields(kind)}
    asked = _asked_sizes(arch, name, overrides)
    differing = [f"{k} {_text(v)} (file: {_text(arch[k])})" for k, v in asked.items() if v != arch[k]]  # fmt: skip
    if arch["mlp_ratio"] != REGISTRY_MLP_RATIO:
        differing.append(f"mlp_ratio {REGISTRY_MLP_RATIO} (file: {arch['mlp_ratio']})")
    if differing:
        raise ArchitectureError(
            f"{source} holds {describe(arch)}; asked for {', '.join(differing)}: leave the name "
            "and sizes out (the file carries them), or load another file"
        )
    base = arch.get("name") or name or next(iter(ENCODER_SIZES))  # every size is explicit
    side = sizes["img_size"]
    sizes["img_size"] = side[0] if side[0] == side[1] else side
    return base, {**overrides, **sizes}


def config_architecture(config: dict[str, Any], module: str | None) -> dict[str, Any] | None:
    """The architecture of trained module `module` (None: the run's only model) recorded in a
    run's saved config: pre-training's `model` group (module `mae`), or distillation's
    `students` (module `student_<name>`). None when the config describes no such module."""
    try:
        if isinstance(config.get("model"), dict) and module in (None, "mae"):
            return _pretrain_architecture(config["model"])
        students = list(config.get("students") or [])
        name = module.removeprefix("student_") if module else (students[0] if len(students) == 1 else None)  # fmt: skip
        if name in students:
            sizes = dict((config.get("student") or {}).get("overrides", {}).get(name) or {})
            kwargs = encoder_kwargs(name, img_size=config["img_size"], n_cls_tokens=config["teacher"]["n_cls_tokens"], **sizes)  # fmt: skip
            return _encoder_arch("encoder", name, kwargs)
    except (KeyError, TypeError, ValueError, AttributeError):  # another layout: not ours to read
        return None
    return None


def _encoder_arch(kind: str, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    arch = {k: kwargs[k] for k in ENCODER_FIELDS if k in kwargs}
    arch |= {"kind": kind, "name": name, "mlp_ratio": REGISTRY_MLP_RATIO}
    arch["img_size"] = _as_size("img_size", arch["img_size"])
    return arch


def _pretrain_architecture(m: dict[str, Any]) -> dict[str, Any]:
    sizes = {k: m[k] for k in ("embed_dim", "depth", "num_heads") if m.get(k) is not None}
    kwargs = encoder_kwargs(m["name"], img_size=m["img_size"], n_cls_tokens=m["n_cls_tokens"], **sizes)  # fmt: skip
    kwargs.setdefault("patch_size", DEFAULT_PATCH_SIZE)
    decoder = {k: m[k] for k in DECODER_FIELDS}
    return _encoder_arch("mae", m["name"], kwargs) | decoder


def state_sizes(state: dict[str, Any]) -> dict[str, Any]:
    """The sizes a Pixio state dict's tensor shapes show (num_heads never does; img_size only
    for a square position table); {} for another model's keys. Works on meta tensors and on
    sharded parameters (their full shape)."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        return {}
    _, n_cls, dim = state["cls_token"].shape  # (1, n_cls, D)
    sizes: dict[str, Any] = {"embed_dim": dim, "n_cls_tokens": n_cls}
    sizes["patch_size"] = patch = state["patch_embed.proj.weight"].shape[-1]  # (D, 3, p, p)
    sizes["depth"] = _count_blocks(state, "blocks.")
    if "blocks.0.mlp.fc1.weight" in state:
        sizes["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    if "pos_embed" in state:
        cells = state["pos_embed"].shape[1] - n_cls  # (1, n_cls + h*w, D)
        side = round(cells**0.5)
        if side * side == cells:
            sizes["img_size"] = (side * patch, side * patch)
    if "decoder_embed.weight" in state:
        sizes["decoder_embed_dim"] = state["decoder_embed.weight"].shape[0]  # (Dd, D)
        sizes["decoder_depth"] = _count_blocks(state, "decoder_blocks.")
    return sizes


def _count_blocks(state: dict[str, Any], prefix: str) -> int:
    """Blocks with an attention (`<prefix><i>.attn.qkv.weight`): a stray key is not a block."""
    return sum(f"{prefix}{i}.attn.qkv.weight" in state for i in range(len(state)))


def size_mismatch(
    expected: dict[str, Any], state: dict[str, Any], source: str | Path
) -> str | None:
    """One line naming the sizes in which checkpoint `state` differs from a model whose state
    dict is `expected` (both read from tensor shapes); None when no size differs (the keys may
    still: the caller then names them)."""
    want, have = state_sizes(expected), state_sizes(state)
    differing = [f"{k} {_text(v)} (file: {_text(have[k])})" for k, v in want.items() if k in have and have[k] != v]  # fmt: skip
    if not differing:
        return None
    return f"{source} does not fit the model: the model has {', '.join(differing)}"


def compare(built: dict[str, Any], arch: dict[str, Any], source: str | Path) -> None:
    """ArchitectureError naming each size in which a built model (`model_architecture`)
    differs from the architecture file `source` records (encoder sizes, and the decoder's
    when both are full models)."""
    kind = "mae" if built["kind"] == arch["kind"] == "mae" else "encoder"
    keys = [k for k in ENCODER_FIELDS | (DECODER_FIELDS if kind == "mae" else {})]
    differing = [f"{k} {_text(built[k])} (file: {_text(arch[k])})" for k in keys if built[k] != arch[k]]  # fmt: skip
    if differing:
        raise ArchitectureError(
            f"{source} holds {describe(arch)}; the model built has {', '.join(differing)}"
        )
