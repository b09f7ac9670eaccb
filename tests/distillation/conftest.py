"""Fixtures of the distillation tests: a tiny teacher checkpoint and a config maker."""

from __future__ import annotations

from pathlib import Path

import pytest
from distill_helpers import compose_distill, overrides_for, write_teacher


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory) -> Path:
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


@pytest.fixture
def distill_config(tmp_path, teacher_path):
    """A composed distillation config shrunk for CPU, writing under tmp_path/run."""

    def make(*extra: str):
        return compose_distill([*overrides_for(teacher_path, tmp_path / "run"), *extra])

    return make


@pytest.fixture(scope="session")
def web_shards(tmp_path_factory) -> Path:
    """Two web-format shards (`.jpeg` members) of 12 smooth random images each, 70-110 px."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(2):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as tar:
            for i in range(12):
                h, w = (int(v) for v in rng.integers(70, 111, 2))
                y, x = np.mgrid[0:h, 0:w] / max(h, w)
                a, b = rng.uniform(0, 6, 2)
                base = np.stack([np.sin(a * x), np.cos(b * y), np.sin(a * x + b * y)], -1)
                pixels = (127.5 + 100 * base).clip(0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG", quality=90)
                tar.write({"__key__": f"{s}{i:04d}", "jpeg": buf.getvalue()})
    return root
