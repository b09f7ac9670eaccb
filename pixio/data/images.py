"""Image decoding for the pre-training stream: any mode -> RGB, RandomResizedCrop, reduced decode.

The crop box is drawn on the stored size (read from the header) before anything is decoded, so a
JPEG can be decoded by libjpeg at 1/2, 1/4 or 1/8 scale (PIL `Image.draft`) whenever the crop is
still at least S pixels on each side at that scale. See docs/data.md, "Reduced-size decode".
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

Box = tuple[int, int, int, int]  # left, top, right, bottom in stored pixels

CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)
DCT_SCALES: tuple[int, ...] = (8, 4, 2)
WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Leading bytes of the formats PIL reads here: bytes that start like one of these and still fail
# to open are a broken image (corrupt_image), anything else is not an image at all.
IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\xff\xd8\xff",
    b"\x89PNG",
    b"GIF8",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
)


class DecodeError(Exception):
    """An image that cannot be used; `reason` is `corrupt_image` or `not_an_image`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def open_image(data: bytes) -> Image.Image:
    """Open lazily (header only); DecodeError classifies bytes PIL cannot identify."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        reason = "corrupt_image" if data.startswith(IMAGE_MAGIC) else "not_an_image"
        raise DecodeError(reason, "unidentified image bytes") from err
    except Exception as err:  # decompression bomb, broken header of a known format
        raise DecodeError("corrupt_image", f"{type(err).__name__}: {err}") from err


def _rescale_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float image -> 8-bit greyscale, rescaled (never clipped).

    16-bit modes map 0..65535 to 0..255; other integer data is taken as 8-bit when it fits, as
    16-bit when it fits there, else min-max scaled; float data in [0, 1] is scaled by 255, other
    float data min-max scaled.
    """
    arr = np.asarray(img).astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and 255 < hi <= 65535 and lo >= 0):
        arr = arr / 257.0
    elif img.mode == "F" and 0.0 <= lo and hi <= 1.0:
        arr = arr * 255.0
    elif lo < 0.0 or hi > 255.0:
        arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.rint(arr).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha composited onto white, high bit depth rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), rgba).convert("RGB")
    if img.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        return _rescale_to_8bit(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_rgb(data: bytes) -> Image.Image:
    """Full decode of image bytes to RGB; DecodeError if they are not a usable image."""
    img = open_image(data)
    try:
        img.load()
        return to_rgb(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        raise DecodeError("corrupt_image", f"{type(err).__name__}: {err}") from err


def draw_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
) -> Box:
    """A RandomResizedCrop box: area fraction ~ U(scale), log aspect ~ U(log ratio), 10 tries,
    then the centre crop with the aspect clamped to `ratio` (torchvision's rule)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    w, h = width, height
    if in_ratio < min(ratio):
        h = round(width / min(ratio))
    elif in_ratio > max(ratio):
        w = round(height * max(ratio))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def snap_box(box: Box, s: int, width: int, height: int) -> Box:
    """Move each edge to the nearest multiple of `s` (right/bottom capped at the image side)."""
    left, top, right, bottom = ((v + s // 2) // s * s for v in box)
    return left, top, min(right, width), min(bottom, height)


def reduced_box(box: Box, s: int) -> Box:
    """A snapped box in the coordinates of the image decoded at 1/s (partial last block kept)."""
    left, top, right, bottom = box
    return left // s, top // s, -(-right // s), -(-bottom // s)


@dataclass(frozen=True)
class CropPlan:
    """Where to crop: `box` in stored pixels (snapped to `scale`) and the DCT `scale` to use."""

    box: Box
    scale: int


def plan_crop(box: Box, size: int, width: int, height: int, is_jpeg: bool) -> CropPlan:
    """Largest DCT scale s in {8, 4, 2} whose snapped crop is still >= `size` on both sides."""
    if is_jpeg:
        for s in DCT_SCALES:
            if box[2] - box[0] < s * size or box[3] - box[1] < s * size:
                continue
            snapped = snap_box(box, s, width, height)
            left, top, right, bottom = reduced_box(snapped, s)
            if right - left >= size and bottom - top >= size:
                return CropPlan(snapped, s)
    return CropPlan(box, 1)


def resize_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, size, size) with torch's antialiased bicubic (channels-last)."""
    with warnings.catch_warnings():  # a read-only view of the bytes: only read, never written
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(img.tobytes(), dtype=torch.uint8)  # one copy less than np.array
    x = flat.view(1, img.height, img.width, 3).permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0]
    return x[0].clone()


def _decode_reduced(img: Image.Image, plan: CropPlan, size: int) -> torch.Tensor:
    """Decode at 1/s where libjpeg allows it, crop the integer region, torch resize."""
    width, height = img.size
    s = plan.scale
    if s > 1:
        img.draft(img.mode, (width // s, height // s))
        if img.size != (-(-width // s), -(-height // s)):  # draft refused (e.g. multi-tile)
            s = 1
    crop = to_rgb(img).crop(reduced_box(plan.box, s) if s > 1 else plan.box)
    return resize_tensor(crop, size)


def _decode_full(img: Image.Image, plan: CropPlan, size: int) -> torch.Tensor:
    """Reference path: full decode, PIL bicubic resize of the same box."""
    out = to_rgb(img).resize((size, size), Image.Resampling.BICUBIC, box=plan.box)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)


def decode_crop(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    reduced: bool = True,
) -> torch.Tensor:
    """Image bytes -> RandomResizedCrop(size) as uint8 (3, size, size); DecodeError if unusable.

    `reduced=False` decodes at full size (same box, PIL resize): the reference path.
    """
    img = open_image(data)
    width, height = img.size
    box = draw_crop_box(width, height, rng, scale)
    plan = plan_crop(box, size, width, height, img.format == "JPEG")
    try:
        return (_decode_reduced if reduced else _decode_full)(img, plan, size)
    except Exception as err:  # truncated / broken data of a known format, decompression bomb
        raise DecodeError("corrupt_image", f"{type(err).__name__}: {err}") from err
