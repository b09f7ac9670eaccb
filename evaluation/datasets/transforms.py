"""Decoding, label remaps and the training augmentations of the protocol (docs/reproduction.md).

Randomness comes only from torch's global generator, which `pixio.runtime.maploader` seeds per
(seed, epoch, index) before each sample: results do not depend on workers, and a resume replays
them. Augmentations work on raw uint8 pixels and items keep them: images leave the workers as
uint8 (3, H, W) and the device normalises them (`pixio.runtime.prefetch.normalize_images`, in the
task's `to_device`), so training pads are black raw pixels (-mean / std once normalised) and mask
pads are 255.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pixio.runtime.job import DataError

IGNORE_INDEX = 255
SEG_SCALE_RANGE: tuple[float, float] = (0.5, 2.0)


class UnreadableImageError(DataError):
    """An image, depth map or mask that cannot be decoded or is not what the dataset expects.
    A job error (`pixio.runtime.job.JOB_ERRORS`): the app ends with one line naming the file."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error reaches the main process rebuilt from a message holding
        # the worker's traceback; its last line is this class's name and the original message.
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            name, found, original = last.partition(": ")
            if found and name.endswith(type(self).__name__):
                message = original
        super().__init__(message)


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 of any image mode; UnreadableImageError names the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # truncated, unidentified, bad header
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def read_plane(path: str) -> np.ndarray:
    """A single-channel png as stored (palette indices, 8- or 16-bit values)."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImageError(f"cannot read {path}: {err}") from err
    if arr.ndim != 2:
        raise UnreadableImageError(f"{path}: expected a single-channel png, got shape {arr.shape}")
    return arr


def remap_labels(raw: np.ndarray, num_classes: int, reduce_zero: bool, path: str) -> np.ndarray:
    """Stored mask -> uint8 ids 0..K-1 and 255. With `reduce_zero` (ADE20K, LoveDA releases) raw 0
    (other / no data) -> 255 and k -> k - 1; a raw value outside 0..K (255 included, which the
    releases never hold) means already re-encoded or corrupt files and is an error naming them."""
    if reduce_zero:
        if raw.max(initial=0) > num_classes:
            raise UnreadableImageError(
                f"{path}: raw label {int(raw.max())} > {num_classes} (files already re-encoded "
                "to 0..K-1/255? pass label_format='reduced')"
            )
        return np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1).astype(np.uint8)
    bad = (raw >= num_classes) & (raw != IGNORE_INDEX)
    if bad.any():
        raise UnreadableImageError(
            f"{path}: label {int(raw[bad][0])} outside 0..{num_classes - 1}/255"
        )
    return raw.astype(np.uint8)


def to_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> contiguous (3, H, W) uint8 (raw pixels; the device normalises)."""
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C"))  # a writable copy


def pad_to(arr: np.ndarray, size: int, value: float) -> np.ndarray:
    """Pad the bottom and right of `arr` with `value` up to `size` on each side (no-op if big)."""
    h, w = arr.shape[:2]
    pad = [(0, max(0, size - h)), (0, max(0, size - w))] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, constant_values=value) if any(p[1] for p in pad[:2]) else arr


def random_crop(arrays: list[np.ndarray], size: int, pads: list[float]) -> list[np.ndarray]:
    """One random `size` x `size` window of equally sized arrays, each padded first with its own
    value where smaller than the window."""
    arrays = [pad_to(a, size, v) for a, v in zip(arrays, pads, strict=True)]
    h, w = arrays[0].shape[:2]
    top = int(torch.randint(0, h - size + 1, ()).item())
    left = int(torch.randint(0, w - size + 1, ()).item())
    return [a[top : top + size, left : left + size] for a in arrays]


def random_flip(arrays: list[np.ndarray], p: float = 0.5) -> list[np.ndarray]:
    """Flip all arrays left-right together with probability `p`."""
    if torch.rand(()).item() < p:
        return [a[:, ::-1] for a in arrays]
    return arrays


def random_rescale(
    image: np.ndarray, mask: np.ndarray, scale_range: tuple[float, float] = SEG_SCALE_RANGE
) -> tuple[np.ndarray, np.ndarray]:
    """Resize both sides (so the long side too) by one ratio drawn uniformly from `scale_range`:
    bicubic for the image, nearest for the mask."""
    low, high = scale_range
    ratio = low + (high - low) * torch.rand(()).item()
    h, w = mask.shape
    size = (max(1, round(w * ratio)), max(1, round(h * ratio)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return image, mask


def eigen_crop(arr: np.ndarray, box: tuple[int, int, int, int], path: str) -> np.ndarray:
    """Rows box[0]:box[1], cols box[2]:box[3]; an image too small for it is an error."""
    top, bottom, left, right = box
    if arr.shape[0] < bottom or arr.shape[1] < right:
        raise UnreadableImageError(
            f"{path}: {arr.shape[0]}x{arr.shape[1]} is smaller than the Eigen crop "
            f"(rows {top}:{bottom}, cols {left}:{right}; NYUv2 frames are 480x640)"
        )
    return arr[top:bottom, left:right]
