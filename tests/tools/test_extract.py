"""`python -m pixio.extract`: features of a folder or of webdataset shards equal the encoder's on
the same inputs; bad images are skipped and named; an interrupted run resumes without redoing
finished shards; two torchrun processes write what one writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tools_helpers import ARCH, ARCH_FLAGS

import pixio
from pixio.data.images import load_rgb
from pixio.extract import main, read_features
from pixio.inference import Resize
from pixio.runtime.prefetch import normalize_images

REPO = Path(__file__).resolve().parents[2]


def run(out: Path, source: list[str], checkpoint: Path, *extra: str) -> None:
    main([*ARCH_FLAGS, "--checkpoint", str(checkpoint), *source, "--out", str(out),
          "--size", "64", "--workers", "0", *extra])  # fmt: skip


def reference(checkpoint: Path, data: bytes, resize: Resize, blocks: list[int]) -> list[dict]:
    """The encoder's features of one image, preprocessed as the extractor does."""
    enc = pixio.load_encoder("pixio_vitt16", checkpoint, **ARCH).eval()
    pixels, _ = resize.apply(load_rgb(data))
    with torch.no_grad():
        return enc(normalize_images(pixels[None]), blocks)


def index_of(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def test_folder_features_equal_the_encoders(demo_folder, checkpoints, tmp_path) -> None:
    out = tmp_path / "feats"
    run(out, ["--images", str(demo_folder)], checkpoints["encoder"], "--blocks", "0,-1")
    index = index_of(out)
    usable = ["astronaut.jpg", "camera.png", "chelsea.jpg", "rocket.jpg", "sub/coffee.png"]
    assert sorted(index["images"]) == usable  # notes.txt is not an input
    assert index["skipped"] == {"broken.jpg": index["skipped"]["broken.jpg"]}
    assert index["skipped"]["broken.jpg"].startswith("corrupt_image: ")
    assert index["counts"] == {"images": 5, "skipped": 1, "by_reason": {"corrupt_image": 1}}
    assert (
        index["blocks"] == [0, 1] and index["norm"] is True and index["resize"]["size"] == [64, 64]
    )
    assert index["encoder_digest"] == pixio.checkpoint.checkpoint_digest(checkpoints["encoder"])
    resize = Resize("short", (64, 64), 16)
    grids = {"astronaut.jpg": (4, 4), "chelsea.jpg": (4, 7), "sub/coffee.png": (6, 4)}
    for key in usable:
        got = read_features(out, key)
        ref = reference(checkpoints["encoder"], (demo_folder / key).read_bytes(), resize, [0, 1])
        h, w = (int(v) for v in got["grid"])
        assert (h, w) == grids.get(key, (h, w))  # aspect kept: short side 64, long side cropped
        for block, f in zip([0, 1], ref, strict=True):
            assert torch.allclose(got[f"cls.{block}"], f["cls_tokens_norm"][0], atol=1e-5)
            assert torch.allclose(got[f"patch.{block}"], f["patch_tokens_norm"][0], atol=1e-5)
            assert got[f"patch.{block}"].shape == (h * w, 64)


def test_fixed_size_block_outputs_patch_only(demo_folder, checkpoints, tmp_path) -> None:
    out = tmp_path / "fixed"
    run(out, ["--images", str(demo_folder)], checkpoints["encoder"], "--resize", "fixed",
        "--size", "32x48", "--no-norm", "--tokens", "patch", "--blocks", "0")  # fmt: skip
    part = load_file(str(out / index_of(out)["images"]["chelsea.jpg"][0]))
    assert set(part) == {"patch.0", "grid", "offsets"}  # no class tokens asked
    got = read_features(out, "chelsea.jpg")["patch.0"]
    ref = reference(
        checkpoints["encoder"], (demo_folder / "chelsea.jpg").read_bytes(),
        Resize("fixed", (32, 48), 16), [0],
    )[0]["patch_tokens"][0]  # fmt: skip
    assert got.shape == (2 * 3, 64) and torch.allclose(got, ref, atol=1e-5)


def test_interrupted_run_resumes_without_redoing_finished_shards(
    demo_folder, checkpoints, tmp_path, capsys
) -> None:
    out, whole = tmp_path / "resumed", tmp_path / "whole"
    flags = ["--shard-size", "2"]  # 6 images (one broken) -> 3 units
    run(out, ["--images", str(demo_folder)], checkpoints["encoder"], *flags, "--max-shards", "1")
    assert "run the same command again" in capsys.readouterr().out
    assert not (out / "index.json").exists() and (out / "features-00000.json").exists()
    assert not (out / "features-00001.json").exists()
    first = out / "features-00000-000.safetensors"
    stamp, content = first.stat().st_mtime_ns, first.read_bytes()
    # A run killed inside unit 1: a part without its manifest, and a temporary file.
    (out / "features-00001-000.safetensors").write_bytes(b"half-written")
    (out / ".features-00002-000.safetensors.tmp-123").write_bytes(b"partial")
    run(out, ["--images", str(demo_folder)], checkpoints["encoder"], *flags)
    assert first.stat().st_mtime_ns == stamp and first.read_bytes() == content  # not redone
    assert not list(out.glob(".*tmp*"))
    run(whole, ["--images", str(demo_folder)], checkpoints["encoder"], *flags)
    assert index_of(out)["images"] == index_of(whole)["images"]
    assert index_of(out)["skipped"] == index_of(whole)["skipped"]
    for name in index_of(whole)["shards"]:
        a, b = load_file(str(out / name)), load_file(str(whole / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_on_the_same_output_are_refused(
    demo_folder, checkpoints, tmp_path, capsys
) -> None:
    out = tmp_path / "feats"
    run(out, ["--images", str(demo_folder)], checkpoints["encoder"], "--max-shards", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(out, ["--images", str(demo_folder)], checkpoints["encoder"], "--blocks", "0")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "other settings (blocks differ)" in err and str(out) in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--size", "70"], "--size 70: not a multiple of the patch size 16"),
        (["--blocks", "5"], "--blocks 5: out of range for an encoder of depth 2"),
        (["--tokens", "cls,registers"], "--tokens 'cls,registers'"),
    ],
)
def test_bad_flags_are_one_line(demo_folder, checkpoints, tmp_path, capsys, flags, message) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path / "x", ["--images", str(demo_folder)], checkpoints["encoder"], *flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_webdataset_shards(demo_shards, checkpoints, tmp_path) -> None:
    out = tmp_path / "feats"
    run(out, ["--shards", f"{demo_shards}/*.tar"], checkpoints["encoder"], "--shard-size", "3")
    index = index_of(out)
    a, b, c = (str(demo_shards / f"{n}.tar") for n in "abc")
    assert sorted(index["images"]) == sorted(
        [f"{a}#a{i}.jpg" for i in range(4)] + [f"{b}#b{i}.png" for i in range(2)] + [f"{c}#c0.jpg"]
    )
    skipped = index["skipped"]
    assert skipped[f"{a}#a_txt"].startswith("not_an_image")
    assert skipped[f"{a}#a_bad.jpg"].startswith("corrupt_image")
    assert skipped[c].startswith("bad_tar")  # the damaged tar itself, by its path
    assert index["shards"][:2] == [
        "features-00000-000.safetensors",
        "features-00000-001.safetensors",
    ]
    with tarfile.open(b) as tar:
        data = tar.extractfile("b1.png").read()
    ref = reference(checkpoints["encoder"], data, Resize("short", (64, 64), 16), [-1])[0]
    got = read_features(out, f"{b}#b1.png")
    assert torch.allclose(got["patch.1"], ref["patch_tokens_norm"][0], atol=1e-5)


def test_two_torchrun_processes_write_what_one_writes(demo_folder, checkpoints, tmp_path) -> None:
    """gloo, 2 ranks: each writes its own units (rank 0: 0 and 2, rank 1: 1), rank 0 the index
    after a barrier; the files equal a one-process run's (one thread each, as torchrun sets)."""
    common = [*ARCH_FLAGS, "--checkpoint", str(checkpoints["encoder"]), "--images",
              str(demo_folder), "--size", "64", "--shard-size", "2", "--device", "cpu"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pixio.extract", *common, "--workers", "1", "--out", str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("pixio.extract under torchrun (2 processes) did not finish in 240 s")
    assert done.returncode == 0, done.stderr[-2000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*common, "--workers", "0", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    one, two = index_of(tmp_path / "one"), index_of(tmp_path / "two")
    assert one == two and one["counts"]["images"] == 5
    ranks = [json.loads((tmp_path / "two" / f"features-{u:05d}.json").read_text())["rank"] for u in range(3)]  # fmt: skip
    assert ranks == [0, 1, 0]
    for name in one["shards"]:
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
