"""Decoding: reduced vs full decode, crop boxes, DCT-scale snapping, colour conversions, errors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from test_data_helpers import image_bytes, png_bytes

from pixio.data.images import (
    DecodeError,
    decode_crop,
    draw_crop_box,
    load_rgb,
    plan_crop,
    reduced_box,
    to_rgb,
)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def smooth_1024x768() -> bytes:
    """A smooth colour test image (low-frequency waves)."""
    yy, xx = np.mgrid[0:768, 0:1024] / 64.0
    arr = np.stack([np.sin(xx), np.cos(yy), np.sin(xx + yy)], axis=-1) * 100 + 128
    return jpeg(Image.fromarray(arr.astype(np.uint8)))


def astronaut_1024x768() -> bytes:
    import skimage.data

    return jpeg(Image.fromarray(skimage.data.astronaut()).resize((1024, 768), Image.BICUBIC))


def both_decodes(data: bytes, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced and full decode of the same box (whole image: crop scale 1)."""
    reduced = decode_crop(data, size, np.random.default_rng(0), (1.0, 1.0), reduced=True)
    full = decode_crop(data, size, np.random.default_rng(0), (1.0, 1.0), reduced=False)
    return reduced.float(), full.float()


@pytest.mark.parametrize(
    "make, size, scale, max_mean, max_max",
    [
        (smooth_1024x768, 64, 8, 0.5, 4),
        (smooth_1024x768, 128, 4, 0.5, 4),
        (smooth_1024x768, 256, 2, 0.5, 4),
        (astronaut_1024x768, 64, 8, 1.5, 30),
        (astronaut_1024x768, 128, 4, 1.0, 30),
        (astronaut_1024x768, 256, 2, 0.6, 30),
    ],
)
def test_reduced_decode_matches_full_decode_at_each_dct_scale(
    make, size: int, scale: int, max_mean: float, max_max: int, monkeypatch
) -> None:
    data = make()
    box = draw_crop_box(1024, 768, np.random.default_rng(0), (1.0, 1.0))
    assert plan_crop(box, size, 1024, 768, is_jpeg=True).scale == scale
    decoded_sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size_hint):
        result = original(self, mode, size_hint)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    reduced, full = both_decodes(data, size)
    assert decoded_sizes == [(1024 // scale, 768 // scale)]  # libjpeg really decoded at 1/s
    diff = (reduced - full).abs()
    assert reduced.shape == full.shape == (3, size, size)
    assert diff.mean() < max_mean and diff.max() <= max_max


def test_crop_boxes_follow_random_resized_crop() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, right, bottom = draw_crop_box(300, 200, rng, (0.2, 1.0))
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        assert 0.2 * 60000 * 0.97 <= w * h <= 60000
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03 or (w, h) == (266, 200)


def test_crop_box_falls_back_to_a_centre_crop_with_clamped_aspect() -> None:
    assert draw_crop_box(400, 100, np.random.default_rng(0), (1.0, 1.0)) == (133, 0, 266, 100)
    assert draw_crop_box(90, 90, np.random.default_rng(0), (1.0, 1.0)) == (0, 0, 90, 90)


def test_snapped_boxes_are_dct_aligned_and_never_smaller_than_the_output() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        width, height = (int(v) for v in rng.integers(200, 2000, size=2))
        box = draw_crop_box(width, height, rng, (0.05, 1.0))
        size = int(rng.integers(32, 256))
        plan = plan_crop(box, size, width, height, is_jpeg=True)
        s = plan.scale
        assert all(abs(a - b) <= s // 2 for a, b in zip(plan.box, box, strict=True))
        if s > 1:
            assert plan.box[0] % s == plan.box[1] % s == 0
            assert plan.box[2] % s == 0 or plan.box[2] == width
            left, top, right, bottom = reduced_box(plan.box, s)
            assert right - left >= size and bottom - top >= size
            assert right <= math.ceil(width / s) and bottom <= math.ceil(height / s)
        else:
            assert min(box[2] - box[0], box[3] - box[1]) < 2 * size + 2


def test_non_jpeg_images_are_decoded_in_full() -> None:
    data = image_bytes(w=600, h=500, fmt="PNG")
    reduced, full = both_decodes(data, 64)
    assert plan_crop((0, 0, 600, 500), 64, 600, 500, is_jpeg=False).scale == 1
    assert (reduced - full).abs().mean() < 1.0


def pixel(img: Image.Image) -> tuple[int, int, int]:
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == img.size
    return rgb.getpixel((0, 0))


def deep(value, mode: str) -> Image.Image:
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    return Image.fromarray(np.full((2, 2), value, dtype=dtype))


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("RGBA", (2, 2), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (2, 2), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
        (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
        (deep(65535, "I;16"), (255, 255, 255)),
        (deep(1000, "I;16"), (4, 4, 4)),  # rescaled by 1/257, not clipped at 255
        (deep(40000, "I"), (156, 156, 156)),
        (deep(0.5, "F"), (128, 128, 128)),
    ],
    ids=["L", "1", "CMYK", "RGBA_clear", "RGBA_opaque", "RGBA_half", "LA", "I16_max", "I16",
         "I32", "F"],
)  # fmt: skip
def test_any_mode_becomes_8bit_rgb(img: Image.Image, expected: tuple[int, int, int]) -> None:
    assert pixel(img) == expected


def test_palette_with_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (2, 2), 0)
    img.putpalette([10, 20, 30] * 256)
    img.info["transparency"] = 0
    assert pixel(img) == (255, 255, 255)


def test_wide_float_range_is_rescaled_not_clipped() -> None:
    img = Image.fromarray(np.array([[-1.0, 3.0]], dtype=np.float32))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 255]


def test_decoded_16bit_png_is_rescaled() -> None:
    data = png_bytes(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)))
    assert load_rgb(data).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not_an_image"),
        (b"plain text, not pixels", "not_an_image"),
        (image_bytes()[:300], "corrupt_image"),
        (image_bytes(fmt="PNG")[:100], "corrupt_image"),
        (b"\xff\xd8\xff" + b"\x00" * 50, "corrupt_image"),
    ],
    ids=["empty", "text", "truncated_jpeg", "truncated_png", "jpeg_magic_junk"],
)
def test_unusable_bytes_are_classified(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_crop(data, 16, np.random.default_rng(0))
    assert err.value.reason == reason
