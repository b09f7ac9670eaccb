"""Fixtures of the command-line tools' tests: scikit-image's bundled photos as a small image
folder and as webdataset shards (nothing downloaded), and tiny local checkpoints."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from tests_helpers import write_tar
from tools_helpers import ARCH, DECODER, demo_image, encoded

import pixio


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """5 usable images (JPEG / PNG, colour and greyscale, landscape, portrait and square, one in
    a subfolder), a broken JPEG and a text file."""
    root = tmp_path_factory.mktemp("demo") / "images"
    (root / "sub").mkdir(parents=True)
    demo_image("astronaut", (96, 80)).save(root / "astronaut.jpg", quality=90)
    demo_image("coffee", (64, 100)).save(root / "sub" / "coffee.png")
    demo_image("camera", (70, 70)).save(root / "camera.png")  # greyscale
    demo_image("chelsea", (120, 64)).save(root / "chelsea.jpg", quality=90)
    demo_image("rocket", (64, 90)).save(root / "rocket.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "notes.txt").write_text("not an input")
    return root


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """web/a.tar (4 images, a sample without image, a broken JPEG), web/b.tar (2 PNGs),
    web/c.tar cut short (bad_tar after its first sample)."""
    root = tmp_path_factory.mktemp("shards") / "web"
    root.mkdir()
    photos = [demo_image(n, (80, 64)) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    samples = [{"__key__": f"a{i}", "jpg": encoded(p, "JPEG")} for i, p in enumerate(photos)]
    samples += [{"__key__": "a_txt", "txt": b"caption only"}]
    samples += [{"__key__": "a_bad", "jpg": b"\xff\xd8\xff\xe0 broken"}]
    write_tar(root / "a.tar", samples)
    write_tar(root / "b.tar", [{"__key__": f"b{i}", "png": encoded(p, "PNG")} for i, p in enumerate(photos[:2])])  # fmt: skip
    cut = write_tar(root / "c.tar", [{"__key__": f"c{i}", "jpg": encoded(p, "JPEG")} for i, p in enumerate(photos[:2])])  # fmt: skip
    with tarfile.open(cut) as tar:
        end = tar.getmembers()[-1].offset_data + 100  # inside the last image's bytes
    cut.write_bytes(cut.read_bytes()[:end])
    return root


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny encoder (final norm moved off its initial value) and a tiny pre-training model
    saved as a trainer would (`{'model': {'mae': ...}}`)."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    enc = pixio.build_encoder("pixio_vitt16", **ARCH)
    with torch.no_grad():
        enc.norm.weight.uniform_(0.5, 1.5)
    mae = pixio.build_mae("pixio_vitt16", **ARCH, **DECODER)
    torch.save({"model": {"mae": mae.state_dict()}}, root / "pretrain.pth")
    return {
        "encoder": pixio.save_encoder(enc, root / "enc.safetensors"),
        "mae": root / "pretrain.pth",
    }
