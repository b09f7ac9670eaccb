"""The shard writer: byte-for-byte JPEGs, conversions, labels, manifest, overwrite rules."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from test_data_helpers import image_bytes, stream_keys

from pixio.data import build_pretrain_dataset
from pixio.data.make_shards import main


def image_folder(root: Path) -> dict[str, bytes]:
    """cat/ and dog/ folders: 3 JPEGs, 1 PNG, 1 unreadable file, 1 non-image file."""
    files = {
        "cat/1.jpg": image_bytes(seed=1),
        "cat/2.JPEG": image_bytes(seed=2),
        "dog/3.jpg": image_bytes(seed=3),
        "dog/4.png": image_bytes(seed=4, fmt="PNG"),
        "dog/broken.jpg": image_bytes(seed=5)[:200],
        "dog/notes.txt": b"not an image",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_web_shards_from_a_folder_with_labels_from_dirs(tmp_path: Path) -> None:
    files = image_folder(tmp_path / "images")
    out = tmp_path / "shards"
    main(["--images", str(tmp_path / "images"), "--out", str(out), "--shard-size", "3",
          "--labels-from-dirs"])  # fmt: skip
    shards = sorted(out.glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    rows = manifest(out / "shard-manifest.csv")
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(4)]  # broken one left out
    members = {k: v for s in shards for k, v in tar_members(s).items()}
    for row in rows:
        data = members[f"{row['key']}.jpeg"]
        source = Path(row["source"]).relative_to(tmp_path / "images").as_posix()
        if source.endswith(".png"):
            assert Image.open(io.BytesIO(data)).format == "JPEG"
        else:
            assert data == files[source]  # JPEGs copied byte for byte
        assert members[f"{row['key']}.cls"] == row["label"].encode()
        assert row["label"] == ("0" if source.startswith("cat") else "1")
    assert (out / "shard-classes.txt").read_text().split() == ["cat", "dog"]
    ds = build_pretrain_dataset(out, kind="web", input_size=16, passes=1, return_keys=True)
    assert len(stream_keys(ds)) == 4


def test_imagenet_shards_from_a_glob_with_csv_labels(tmp_path: Path) -> None:
    image_folder(tmp_path / "images")
    labels = tmp_path / "labels.csv"  # paths relative to the folder, or bare file names
    labels.write_text("path,label\ncat/1.jpg,7\n2.JPEG,7\ndog/3.jpg,12\n4.png,12\nbroken.jpg,1\n")
    out = tmp_path / "in1k"
    main(["--images", str(tmp_path / "images" / "**" / "*.*"), "--out", str(out), "--kind",
          "imagenet", "--labels", str(labels), "--no-shuffle"])  # fmt: skip
    rows = manifest(out / "imagenet-train-manifest.csv")
    assert [(Path(r["source"]).name, r["label"]) for r in rows] == [
        ("1.jpg", "7"), ("2.JPEG", "7"), ("3.jpg", "12"), ("4.png", "12"),
    ]  # fmt: skip
    assert not (out / "imagenet-train-classes.txt").exists()
    members = tar_members(out / "imagenet-train-000000.tar")
    assert sorted(members)[:2] == ["000000000.cls", "000000000.jpg"] and len(members) == 8
    ds = build_pretrain_dataset(out, kind="imagenet", input_size=16, shuffle_buffer=0)
    assert next(iter(ds)).shape == (3, 16, 16)


def test_images_missing_from_the_label_csv_are_an_error(tmp_path: Path) -> None:
    image_folder(tmp_path / "images")
    labels = tmp_path / "labels.csv"
    labels.write_text("cat/1.jpg,0\n")
    with pytest.raises(SystemExit, match="no label"):
        main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"),
              "--labels", str(labels)])  # fmt: skip


def test_existing_shards_need_overwrite_which_removes_stale_ones(tmp_path: Path) -> None:
    image_folder(tmp_path / "images")
    out = tmp_path / "shards"
    args = ["--images", str(tmp_path / "images"), "--out", str(out)]
    main([*args, "--shard-size", "1"])
    assert len(list(out.glob("shard-*.tar"))) == 4
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args)
    main([*args, "--overwrite"])
    assert [p.name for p in out.glob("shard-*.tar")] == ["shard-000000.tar"]
    assert not list(out.glob(".*.tmp"))


def test_imagenet_prefix_must_contain_train(tmp_path: Path) -> None:
    image_folder(tmp_path / "images")
    with pytest.raises(SystemExit, match="train"):
        main(["--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--kind",
              "imagenet", "--prefix", "val"])  # fmt: skip
