"""Helpers of the command-line tools' tests: the tiny model's flags, scikit-image's bundled
photos (pixio.data.demo's sources; nothing downloaded), webdataset tars."""

from __future__ import annotations

import io

from PIL import Image

from pixio.data.demo import SOURCES, as_uint8_image

# A tiny pixio_vitt16 at 64 px and the command-line flags that build it.
ARCH = dict(depth=2, img_size=64, embed_dim=64, num_heads=4)
DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mask_grid=2)
ARCH_FLAGS = ["--model", "pixio_vitt16"] + [f for k, v in ARCH.items() for f in ("--override", f"{k}={v}")]  # fmt: skip
DECODER_FLAGS = [f for k, v in DECODER.items() for f in ("--override", f"{k}={v}")]


def demo_image(name: str, size: tuple[int, int]) -> Image.Image:
    """A photo bundled with scikit-image (pixio.data.demo's sources), resized to (w, h)."""
    return as_uint8_image(SOURCES[name][0]()).resize(size, Image.Resampling.BICUBIC)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()
