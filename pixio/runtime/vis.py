"""Pictures written by the trainer (each task draws its own; see `Task.pictures`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W, 3) uint8 array as PNG (parent folders created; temp file + rename so a
    reader never sees half a picture). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
