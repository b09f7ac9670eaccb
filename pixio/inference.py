"""What the inference tools (`pixio.extract`, `pixio.visualize`) share: the encoder from a local
checkpoint (rank 0 reads, the others receive it), the images of a folder, and how an image
becomes the encoder's input (the resize policy, ImageNet normalisation)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixio.architecture import resolve
from pixio.checkpoint import broadcast_encoder_state, read_architecture
from pixio.convert import parse_override
from pixio.models.encoder import PixioEncoder
from pixio.models.registry import build_encoder, list_models

# File endings read as images in a folder (case-insensitive); other files are not inputs.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
POLICIES = ("short", "fixed")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted; hidden files and folders left out).
    FileNotFoundError when the folder is missing or holds no image."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a directory")
    found = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )  # fmt: skip
    if not found:
        raise FileNotFoundError(f"--images {root}: no image file ({', '.join(IMAGE_SUFFIXES)})")
    return found


@dataclass(frozen=True)
class Placement:
    """Where an image went: resized to `resized` (w, h), then cropped to `box` (l, t, r, b)."""

    original: tuple[int, int]  # (w, h) as stored
    resized: tuple[int, int]
    box: tuple[int, int, int, int]

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """A point in the stored image's pixels -> the same point in the input's pixels."""
        sx, sy = self.resized[0] / self.original[0], self.resized[1] / self.original[1]
        return x * sx - self.box[0], y * sy - self.box[1]


@dataclass(frozen=True)
class Resize:
    """How an image becomes the encoder's input.

    "short": aspect kept, the shorter side resized to `size[0]` (bicubic), then a centre crop of
    the longer side to a multiple of `multiple`. "fixed": resized to exactly `size` = (H, W).
    Sizes are multiples of `multiple`: the patch size for an encoder, patch size x mask grid
    for the pre-training model (its masking groups tile the image)."""

    policy: str
    size: tuple[int, int]  # "short": (S, S); "fixed": (H, W)
    multiple: int

    @classmethod
    def parse(cls, text: str, policy: str, multiple: int, what: str = "the patch size") -> Resize:
        """`--size 256` or `--size 224x320` (fixed only); ValueError naming the problem."""
        if policy not in POLICIES:
            raise ValueError(f"--resize {policy!r}: one of {', '.join(POLICIES)}")
        parts = text.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--size {text!r}: expected S or HxW in pixels")
        size = (int(parts[0]), int(parts[-1]))
        if len(parts) == 2 and policy == "short":
            raise ValueError(f"--size {text}: --resize short takes one side (the shorter one)")
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(f"--size {text}: not a multiple of {what} {multiple}")
        return cls(policy, size, multiple)

    def place(self, width: int, height: int) -> Placement:
        """The resize and crop of a (width, height) image."""
        if self.policy == "fixed":
            h, w = self.size
            return Placement((width, height), (w, h), (0, 0, w, h))
        factor = self.size[0] / min(width, height)
        w, h = max(1, round(width * factor)), max(1, round(height * factor))
        w, h = (self.size[0], h) if width <= height else (w, self.size[0])  # short side exact
        cw, ch = w // self.multiple * self.multiple, h // self.multiple * self.multiple
        left, top = (w - cw) // 2, (h - ch) // 2
        return Placement((width, height), (w, h), (left, top, left + cw, top + ch))

    def apply(self, img: Image.Image) -> tuple[torch.Tensor, Placement]:
        """RGB image -> uint8 (3, H, W) input and where it went."""
        placement = self.place(img.width, img.height)
        out = img.resize(placement.resized, Image.Resampling.BICUBIC).crop(placement.box)
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1), placement

    def describe(self) -> dict[str, Any]:
        return {"policy": self.policy, "size": list(self.size), "multiple": self.multiple}


def encoder_build(
    name: str | None, checkpoint: str | Path, module: str | None, overrides: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(registry name, build overrides) of the encoder in `checkpoint`: the architecture it
    records, checked against `name` and `overrides` (one line naming the differing sizes), or
    those two when it records none (`name` is then required)."""
    source = str(checkpoint) if module is None else f"{checkpoint} (module {module!r})"
    arch = read_architecture(checkpoint, module, run_config=name is None)
    return resolve(arch, name, overrides, source)


def load_frozen_encoder(
    name: str,
    checkpoint: str | Path,
    module: str | None = None,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> PixioEncoder:
    """Encoder `name` on `device`, eval mode, no gradients. Built on the meta device and filled
    by rank 0's strict read of `checkpoint` (any format `pixio.load_encoder` reads), broadcast
    to the other ranks of a process group: one read of the file per job, not per rank."""
    with torch.device("meta"):
        encoder = build_encoder(name, **overrides)
    encoder.to_empty(device=device)
    broadcast_encoder_state(encoder, checkpoint, module)
    encoder.requires_grad_(False)
    return encoder.eval()


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint, --module, --override: which encoder and its weights (--model and
    --override only for a checkpoint that does not record its architecture)."""
    parser.add_argument(
        "--model", choices=list_models(),
        help="registry name; needed only when the checkpoint does not record its architecture "
        "(a reference .pth, a Hugging Face folder)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", required=True,
        help="local weights: any format pixio.load_encoder reads (.pth, .safetensors, a "
        "training checkpoint directory, a Hugging Face Pixio folder)",
    )  # fmt: skip
    parser.add_argument(
        "--module", help="the trained module of a training checkpoint (default: the only one)"
    )
    parser.add_argument(
        "--override", action="append", default=[], type=parse_override, metavar="KEY=VALUE",
        help="build_encoder override, e.g. --override depth=4 (repeatable)",
    )  # fmt: skip


def add_image_args(parser: argparse.ArgumentParser, default_size: str = "256") -> None:
    """--size and --resize: the input resolution and how images get there."""
    parser.add_argument(
        "--size", default=default_size,
        help="input size in pixels, a multiple of the patch: S (the shorter side with "
        "--resize short, S x S with fixed) or HxW (fixed)",
    )  # fmt: skip
    parser.add_argument(
        "--resize", default="short", choices=POLICIES,
        help="short: aspect kept, shorter side to S, longer side centre-cropped to a multiple "
        "of the patch; fixed: resized to exactly the size",
    )  # fmt: skip


def fail(prog: str, err: Exception) -> None:
    """A refused input or setting of a command: one line on stderr, exit status 2."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    print(f"{prog}: error: {' '.join(text.split())}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(
    prog: str, parser: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], Any],
    argv: list[str] | None,
) -> Any:  # fmt: skip
    """Parse `argv` and run `fn(args)`; a refused input or setting (ValueError,
    FileNotFoundError, KeyError) ends the command with one line (`fail`)."""
    args = parser.parse_args(argv)
    try:
        return fn(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        fail(prog, err)
