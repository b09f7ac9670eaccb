"""Evaluation datasets on tiny sets written in the releases' layouts: shapes, label remaps, depth
scales, the Eigen crop, training crops (pads, flips, seeding), split lists and errors."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.datasets import (
    DATASETS,
    UnreadableImageError,
    build_dataset,
    read_split_list,
    scan_layout,
)
from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.runtime.maploader import MapLoader
from pixio.runtime.prefetch import normalize_images

ALL = ("nyuv2", "kitti", "ade20k", "pascal", "loveda")
MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
STD = np.asarray(IMAGENET_STD, dtype=np.float32)
BLACK = torch.from_numpy(-MEAN / STD)  # a black raw pixel once normalised


def stored(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def device_image(item: dict) -> torch.Tensor:
    """An item's uint8 image as the task's `to_device` normalises it."""
    assert item["image"].dtype == torch.uint8
    return normalize_images(item["image"])


def normalised(rgb: np.ndarray) -> torch.Tensor:
    """The expected (3, H, W) tensor of raw uint8 pixels, computed independently."""
    return torch.from_numpy(((rgb.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def halves(h: int, w: int, split_col: int) -> np.ndarray:
    """An RGB image black left of `split_col`, white from it on."""
    image = np.full((h, w, 3), 255, dtype=np.uint8)
    image[:, :split_col] = 0
    return image


@pytest.mark.parametrize("name", ALL)
def test_items_follow_the_interface(eval_demo, name):
    root, info = eval_demo(name), DATASETS[name]
    key = "depth" if info.task == "depth" else "mask"
    train, val = build_dataset(name, root, "train"), build_dataset(name, root, "val")
    assert (len(train), len(val)) == (8, 3)
    torch.manual_seed(0)
    for i in range(len(train)):
        item = train[i]
        assert item["index"] == i and item["image"].shape == (3, 256, 256)
        assert item["image"].dtype == torch.uint8 and item["image"].is_contiguous()
        target = item[key]
        assert target.shape == ((1, 256, 256) if key == "depth" else (256, 256))
        assert target.dtype == (torch.float32 if key == "depth" else torch.int64)
        if key == "mask":
            assert set(np.unique(target.numpy()).tolist()) <= set(range(info.num_classes)) | {255}
        else:
            assert target.min() >= 0 and target.max() <= info.max_depth and (target > 0).any()
    for i, (image_path, _) in enumerate(val.pairs):
        h, w = stored(image_path).shape[:2]
        item = val[i]
        size = (426, 560) if name == "nyuv2" else (h, w)
        assert item["image"].shape == (3, *size) and item[key].shape[-2:] == size


@pytest.mark.parametrize(
    "name, probes", [("ade20k", {0: 255, 5: 4, 150: 149}), ("loveda", {0: 255, 3: 2, 7: 6})]
)
def test_release_labels_are_reduced_on_the_fly(eval_demo, name, probes):
    val = build_dataset(name, eval_demo(name), "val")
    seen = set()
    for i, (_, target) in enumerate(val.pairs):
        raw, mask = stored(target), val[i]["mask"].numpy()
        assert np.array_equal(mask, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
        for value, expected in probes.items():
            if (raw == value).any():
                seen.add(value)
                assert (mask[raw == value] == expected).all()
    assert seen == set(probes)  # the demo masks hold every probed raw value


def test_voc_palette_indices_are_the_class_ids(eval_demo):
    val = build_dataset("pascal", eval_demo("pascal"), "val")
    for i, (_, target) in enumerate(val.pairs):
        with Image.open(target) as img:
            assert img.mode == "P"  # the release's palette png, not colours
        raw = stored(target)
        assert {0, 15, 255} <= set(np.unique(raw).tolist())
        assert np.array_equal(val[i]["mask"].numpy(), raw)


def test_re_encoded_masks_are_refused_as_raw_and_read_as_reduced(eval_demo_copy):
    root = eval_demo_copy("ade20k")
    target = scan_layout("ade20k", root, "val")[0][1]
    reduced = np.where(stored(target) == 0, 255, stored(target) - 1).astype(np.uint8)
    save(reduced, target)
    with pytest.raises(UnreadableImageError, match=f"{target}.*label_format"):
        build_dataset("ade20k", root, "val")[0]
    mask = build_dataset("ade20k", root, "val", label_format="reduced")[0]["mask"]
    assert np.array_equal(mask.numpy(), reduced)


def test_depth_png_scales_are_exact(tmp_path):
    depth = np.full((300, 400), 640, dtype=np.uint16)
    depth[10, 20], depth[11, 20] = 0, 65535
    save(halves(300, 400, 200), tmp_path / "kitti/images/a.png")
    save(depth, tmp_path / "kitti/annotations/a.png")
    (tmp_path / "list.txt").write_text("images/a.png annotations/a.png\n")
    item = build_dataset("kitti", tmp_path / "kitti", "val", tmp_path / "list.txt")[0]
    assert item["depth"].dtype == torch.float32 and item["depth"].shape == (1, 300, 400)
    assert item["depth"][0, 0, 0] == 2.5 and item["depth"][0, 10, 20] == 0
    assert item["depth"][0, 11, 20] == 65535 / 256


def test_depth_files_of_the_wrong_kind_are_errors_naming_them(tmp_path):
    save(halves(40, 60, 30), tmp_path / "images/a.png")
    save(np.full((40, 60), 9, dtype=np.uint8), tmp_path / "annotations/a.png")  # 8-bit
    save(halves(40, 60, 30), tmp_path / "images/b.png")
    save(np.full((40, 61), 640, dtype=np.uint16), tmp_path / "annotations/b.png")  # wrong size
    lines = "images/a.png annotations/a.png\nimages/b.png annotations/b.png\n"
    (tmp_path / "list.txt").write_text(lines)
    val = build_dataset("kitti", tmp_path, "val", tmp_path / "list.txt")
    with pytest.raises(UnreadableImageError, match=f"{tmp_path / 'annotations/a.png'}.*16-bit"):
        val[0]
    with pytest.raises(UnreadableImageError, match=f"{tmp_path / 'images/b.png'}.*annotations"):
        val[1]


def write_nyu_frame(root: Path, folder: str) -> None:
    """A 480 x 640 frame: red with depth 0 outside the Eigen crop, grey at 2500 mm inside."""
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    image[..., 0] = 255
    image[45:471, 41:601] = 128
    depth = np.zeros((480, 640), dtype=np.uint16)
    depth[45:471, 41:601] = 2500
    depth[100, 100] = 0  # an invalid pixel inside the crop
    save(image, root / folder / "scene_0001" / "rgb_00000.png")
    save(depth, root / folder / "scene_0001" / "sync_depth_00000.png")
    Image.fromarray(image).save(root / folder / "scene_0001" / "rgb_00000.jpg", quality=100)


def test_nyuv2_eigen_crop_on_val_and_train(tmp_path, eval_demo):
    root = tmp_path / "nyu"
    write_nyu_frame(root, "sync")
    write_nyu_frame(root, "official_splits/test")
    val = build_dataset("nyuv2", root, "val")[0]
    assert val["depth"].shape == (1, 426, 560) and val["depth"][0, 55, 59] == 0
    assert (val["depth"].flatten().unique() == torch.tensor([0.0, 2.5])).all()
    train = build_dataset("nyuv2", root, "train")
    for seed in range(4):
        torch.manual_seed(seed)
        item = train[0]
        depth, red = item["depth"], device_image(item)[0] > 1.5  # raw 255 red is > 2 normalised
        assert ((depth == 2.5) | (depth == 0)).all() and (depth == 2.5).float().mean() > 0.99
        assert not red.any()  # nothing from outside the crop
    demo = build_dataset("nyuv2", eval_demo("nyuv2"), "val")  # the crop, pixel for pixel
    image_path, depth_path = demo.pairs[1]
    item = demo[1]
    raw = stored(image_path)[45:471, 41:601]
    assert torch.equal(item["image"], torch.from_numpy(raw.transpose(2, 0, 1).copy()))
    assert torch.allclose(device_image(item), normalised(raw), atol=1e-6)
    expected = stored(depth_path)[45:471, 41:601].astype(np.float32) / np.float32(1000)
    assert torch.equal(item["depth"][0], torch.from_numpy(expected))


def test_training_crops_pad_black_raw_pixels_and_ignore_masks(eval_demo):
    kitti = build_dataset("kitti", eval_demo("kitti"), "train")
    assert stored(kitti.pairs[1][0]).shape[:2] == (168, 224)  # smaller than the crop
    item = kitti[1]
    assert torch.allclose(device_image(item)[:, 168:], BLACK.view(3, 1, 1).expand(3, 88, 256))
    assert (item["depth"][:, 168:] == 0).all() and (item["depth"][:, :168] > 0).any()
    ade = build_dataset("ade20k", eval_demo("ade20k"), "train")
    ade.scale_range = (0.5, 0.5)  # 168 x 224 -> 84 x 112
    item = ade[1]
    assert torch.allclose(device_image(item)[:, 84:], BLACK.view(3, 1, 1).expand(3, 172, 256))
    # Labels only in the top 84 rows; which columns hold them depends on the random flip (below).
    assert (item["mask"][84:] == 255).all() and (item["mask"][:84] < 255).any()
    right, left = item["mask"][:, 112:], item["mask"][:, :144]  # the pad side depends on the flip
    assert (right == 255).all() or (left == 255).all()
    cols = slice(112, None) if (right == 255).all() else slice(0, 144)
    assert torch.allclose(device_image(item)[:, :, cols], BLACK.view(3, 1, 1).expand(3, 256, 144))


def test_flips_move_image_and_target_together(tmp_path):
    # ADE20K (jpg, mask) and KITTI (png, depth): black left of column 100, white right of it.
    save(halves(300, 256, 100), tmp_path / "ade/images/training/ADE_train_00000001.jpg")
    mask = np.where(halves(300, 256, 100)[..., 0] == 0, 1, 2).astype(np.uint8)
    save(mask, tmp_path / "ade/annotations/training/ADE_train_00000001.png")
    save(halves(300, 256, 100), tmp_path / "kitti/images/a.png")
    save((mask.astype(np.uint16) * 256), tmp_path / "kitti/annotations/a.png")
    (tmp_path / "list.txt").write_text("images/a.png annotations/a.png\n")
    seg = build_dataset("ade20k", tmp_path / "ade", "train")
    seg.scale_range = (1.0, 1.0)
    depth = build_dataset("kitti", tmp_path / "kitti", "train", tmp_path / "list.txt")
    away = np.r_[0:90, 110:146, 166:256]  # columns 10 px away from either possible edge
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        item = seg[0]
        dark = device_image(item)[0][:, away] < 0
        assert torch.equal(dark, item["mask"][:, away] == 0)
        flips.add(bool(dark[:, -1].all()))
        item = depth[0]
        assert torch.equal(device_image(item)[0][:, away] < 0, item["depth"][0][:, away] == 1.0)
    assert flips == {False, True}


def test_augmentation_follows_the_global_seed(eval_demo):
    train = build_dataset("ade20k", eval_demo("ade20k"), "train")
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        draws.append(train[2])
    assert torch.equal(draws[0]["image"], draws[1]["image"])
    assert torch.equal(draws[0]["mask"], draws[1]["mask"])
    assert not torch.equal(draws[0]["mask"], draws[2]["mask"])
    batches = [next(iter(MapLoader(train, 2, seed=7).iterate(0))) for _ in range(2)]
    assert torch.equal(batches[0]["image"], batches[1]["image"])


def test_split_lists_parse_the_reference_format(eval_demo, tmp_path):
    root = eval_demo("ade20k")
    pairs = scan_layout("ade20k", root, "val")
    rel = [(i.relative_to(root).as_posix(), t.relative_to(root).as_posix()) for i, t in pairs]
    lines = ["# a comment", "", f"{rel[0][0]} {rel[0][1]}", f"  {rel[1][0]}\t{rel[1][1]} 518.8579"]
    lines.append(f"{pairs[2][0]} {pairs[2][1]}")  # absolute paths are kept
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    assert read_split_list(tmp_path / "val.txt", root) == pairs
    listed, scanned = (
        build_dataset("ade20k", root, "val", f) for f in (tmp_path / "val.txt", None)
    )
    assert torch.equal(listed[1]["mask"], scanned[1]["mask"])
    (tmp_path / "bad.txt").write_text(f"{rel[0][0]} {rel[0][1]}\n{rel[1][0]} None 518.8\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad.txt'}:2"):
        read_split_list(tmp_path / "bad.txt", root)


def test_missing_paths_are_errors_naming_them(eval_demo, eval_demo_copy, tmp_path):
    root = eval_demo("ade20k")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        build_dataset("ade20k", tmp_path / "nowhere", "val")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val.txt")):
        build_dataset("ade20k", root, "val", tmp_path / "val.txt")
    (tmp_path / "val.txt").write_text("images/gone.jpg annotations/gone.png\n")
    with pytest.raises(FileNotFoundError, match=str(root / "images/gone.jpg")):
        build_dataset("ade20k", root, "val", tmp_path / "val.txt")
    with pytest.raises(FileNotFoundError, match=str(eval_demo("kitti").parent / "splits/val.txt")):
        build_dataset("kitti", eval_demo("kitti").parent, "val")
    copy = eval_demo_copy("pascal")
    (copy / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=str(copy / "ImageSets/Segmentation/val.txt")):
        build_dataset("pascal", copy, "val")
    lost = scan_layout("pascal", copy, "train")[3][1]
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=str(lost)):
        build_dataset("pascal", copy, "train")
    with pytest.raises(ValueError, match="known"):
        build_dataset("cityscapes", root, "val")


def test_scanned_image_without_target_is_an_error(eval_demo_copy):
    root = eval_demo_copy("loveda")
    image, target = scan_layout("loveda", root, "val")[1]
    target.unlink()
    with pytest.raises(FileNotFoundError, match=f"{target}.*{image}"):
        build_dataset("loveda", root, "val")


def test_unreadable_validation_files_are_errors_naming_them(eval_demo_copy):
    root = eval_demo_copy("ade20k")
    val = build_dataset("ade20k", root, "val")
    (image1, _), (image2, target2) = val.pairs[1], val.pairs[2]
    image1.write_bytes(image1.read_bytes()[:300])  # truncated jpeg: fails only when decoded
    image2.write_bytes(b"not an image")
    assert len(val) == 3  # nothing dropped
    for path, index in ((image1, 1), (image2, 2)):
        with pytest.raises(UnreadableImageError, match=str(path)):
            val[index]
    target2.write_bytes(b"\x89PNG broken")
    with pytest.raises(UnreadableImageError, match=str(target2)):
        build_dataset("ade20k", root, "val", label_format="reduced").read_mask(2)


def test_voc_reads_the_sbd_augmented_list_when_present(eval_demo):
    plain, aug = eval_demo("pascal"), eval_demo("pascal", sbd_aug=True)
    assert len(build_dataset("pascal", plain, "train")) == 8
    train = build_dataset("pascal", aug, "train")
    assert len(train) == 10 and {t.parent.name for _, t in train.pairs} == {"SegmentationClassAug"}
    assert len(build_dataset("pascal", aug, "val")) == 3
    assert train[9]["mask"].shape == (256, 256)


def test_loveda_single_level_and_vocdevkit_roots_are_found(eval_demo_copy, tmp_path):
    loveda = eval_demo_copy("loveda")
    (loveda / "Val" / "Val").rename(tmp_path / "moved")
    (loveda / "Val").rmdir()
    (tmp_path / "moved").rename(loveda / "Val")  # Val/Rural/... as some archives unpack
    assert len(build_dataset("loveda", loveda, "val")) == 3
    devkit = tmp_path / "VOCdevkit"
    devkit.mkdir()
    eval_demo_copy("pascal").rename(devkit / "VOC2012")
    assert len(build_dataset("pascal", devkit, "val")) == 3


def test_dataset_modules_import_only_torch_numpy_pil_pixio():
    allowed = {"torch", "numpy", "PIL", "pixio", "evaluation", "__future__"}
    folder = Path(__file__).parents[2] / "evaluation" / "datasets"
    for file in folder.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                assert not names[0].startswith("evaluation.") or names[0].startswith(
                    "evaluation.datasets"
                ), file
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, (file, name)


def test_loveda_with_one_domain_only(tmp_path):
    # A validation set of one image lands in Rural only; Urban absent must not be an error.
    from evaluation.datasets import build_dataset
    from evaluation.demo_data import build_demo

    root = build_demo("loveda", tmp_path / "loveda", n_train=2, n_val=1)
    assert not (root / "Val" / "Val" / "Urban").exists() or not any(
        (root / "Val" / "Val" / "Urban").rglob("*.png")
    )
    assert len(build_dataset("loveda", root, "val")) == 1


# ---- data checks: encodings, repeated pairs, label formats -------------------------------------
def _one_pair_kitti(root: Path, depth: np.ndarray) -> Path:
    """A KITTI-layout pair with `depth` stored as given; returns the list naming it."""
    save(halves(*depth.shape, 10), root / "images/a.png")
    save(depth, root / "annotations/a.png")  # bool: a 1-bit png
    (root / "list.txt").write_text("images/a.png annotations/a.png\n")
    return root / "list.txt"


@pytest.mark.parametrize(
    "depth, why",
    [
        (np.ones((20, 30), dtype=bool), "expected a 16-bit depth png, got 1-bit"),
        (np.full((20, 30), 80, dtype=np.uint16), "its largest value is 80, so every depth would be under 0.312 m: depth stored in metres? kitti depth pngs hold metres x 256"),
        (np.full((20, 30), 3, dtype=np.uint16), "its largest value is 3, so every depth"),
    ],
)  # fmt: skip
def test_depth_pngs_that_cannot_hold_the_encoding_name_the_file(tmp_path, depth, why):
    listed = _one_pair_kitti(tmp_path, depth)
    with pytest.raises(UnreadableImageError) as caught:
        build_dataset("kitti", tmp_path, "val", listed)[0]
    assert str(caught.value).startswith(f"{tmp_path / 'annotations/a.png'}: {why}")


def test_depth_pngs_just_above_the_metre_range_or_empty_are_read(tmp_path):
    depth = np.zeros((20, 30), dtype=np.uint16)
    listed = _one_pair_kitti(tmp_path, depth)
    assert build_dataset("kitti", tmp_path, "val", listed)[0]["depth"].max() == 0  # no error
    depth[3, 4] = 81  # 0.32 m: one value above the metre range is enough
    _one_pair_kitti(tmp_path, depth)
    assert build_dataset("kitti", tmp_path, "val", listed)[0]["depth"][0, 3, 4] == 81 / 256


def test_nyuv2_depth_in_metres_is_refused_naming_the_file(tmp_path):
    root = tmp_path / "nyu"
    write_nyu_frame(root, "official_splits/test")
    target = root / "official_splits/test/scene_0001/sync_depth_00000.png"
    save((stored(target) > 0).astype(np.uint16) * 3, target)  # 3 "metres" where mm are expected
    with pytest.raises(UnreadableImageError, match=f"^{target}: .* under 0.01 m: .* x 1000$"):
        build_dataset("nyuv2", root, "val")[0]


def test_a_pair_listed_twice_is_an_error_naming_the_list_and_lines(eval_demo, tmp_path):
    root = eval_demo("ade20k")
    rel = [f"{i.relative_to(root)} {t.relative_to(root)}" for i, t in scan_layout("ade20k", root, "val")]  # fmt: skip
    (tmp_path / "val.txt").write_text("\n".join(["# header", *rel, "", rel[1]]) + "\n")
    with pytest.raises(ValueError) as caught:
        build_dataset("ade20k", root, "val", tmp_path / "val.txt")
    assert str(caught.value) == f"{tmp_path / 'val.txt'}:6: {rel[1]} is listed twice (first on line 3)"  # fmt: skip


def test_a_voc_id_listed_twice_is_an_error_naming_the_file(eval_demo_copy):
    root = eval_demo_copy("pascal")
    ids_file = root / "ImageSets/Segmentation/val.txt"
    first = ids_file.read_text().split()[0]
    ids_file.write_text(ids_file.read_text() + f"{first}\n")
    with pytest.raises(ValueError, match=f"^{ids_file}:4: {first} is listed twice \\(first on line 1\\)$"):  # fmt: skip
        build_dataset("pascal", root, "val")


def _without_flag(root: Path) -> list[Path]:
    """Raw ADE20K masks with no 150 (so nothing refuses them when read as reduced)."""
    targets = [t for split in ("train", "val") for _, t in scan_layout("ade20k", root, split)]
    for target in targets:
        save(np.minimum(stored(target), 149), target)
    return targets


def _count_reads(monkeypatch) -> list[str]:
    from evaluation.datasets import transforms

    reads, read_plane = [], transforms.read_plane
    monkeypatch.setattr(transforms, "read_plane", lambda p: reads.append(p) or read_plane(p))
    return reads


def test_raw_masks_read_as_reduced_warn_once_naming_the_split(eval_demo_copy, caplog, monkeypatch):
    root = eval_demo_copy("ade20k")
    _without_flag(root)
    reads = _count_reads(monkeypatch)
    with caplog.at_level("WARNING", logger="pixio.eval"):
        build_dataset("ade20k", root, "train", label_format="reduced")
    assert [r.getMessage() for r in caplog.records] == [
        f"ade20k train split: no 255 in the 8 masks sampled from {root}, but a reduced ade20k set "
        "marks other / no-data pixels 255: if these are the release's raw masks, every class is "
        "off by one (mIoU near 0); set data.label_format=raw (python -m evaluation.prepare ade20k "
        "ROOT --verify lists the stored values)"
    ]
    assert len(reads) == 8  # at most REDUCED_SAMPLE (16) masks, evenly spaced


def test_reduced_masks_cost_one_read_and_raw_reading_none(
    eval_demo, eval_demo_copy, caplog, monkeypatch
):
    root = eval_demo_copy("ade20k")
    for target in _without_flag(root):  # now re-encode: 0 (other) -> 255, k -> k - 1
        raw = stored(target)
        save(np.where(raw == 0, 255, raw - 1).astype(np.uint8), target)
    reads = _count_reads(monkeypatch)
    with caplog.at_level("WARNING", logger="pixio.eval"):
        build_dataset("ade20k", root, "val", label_format="reduced")
        assert len(reads) == 1  # the first sampled mask holds 255: done
        build_dataset("loveda", eval_demo("loveda"), "val")  # raw: nothing sampled
        build_dataset("pascal", eval_demo("pascal"), "val", label_format="reduced")
    assert len(reads) == 1 and not caplog.records


def test_a_worker_error_reaches_the_main_process_as_its_one_line(tmp_path):
    from torch.utils.data import DataLoader

    from pixio.runtime.job import error_line

    listed = _one_pair_kitti(tmp_path, np.ones((20, 30), dtype=bool))
    loader = DataLoader(build_dataset("kitti", tmp_path, "val", listed), num_workers=1)
    with pytest.raises(UnreadableImageError) as caught:
        next(iter(loader))
    expected = f"{tmp_path / 'annotations/a.png'}: expected a 16-bit depth png, got 1-bit"
    assert str(caught.value) == expected and error_line(caught.value) == expected
