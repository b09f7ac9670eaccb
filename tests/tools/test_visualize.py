"""`python -m pixio.visualize`: the PCA colouring, similarity maps and reconstructions behind the
pictures are checked against hand computations; each command writes a titled PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tools_helpers import ARCH, ARCH_FLAGS, DECODER, DECODER_FLAGS

import pixio
from pixio.hub import load_mae
from pixio.inference import Placement, Resize
from pixio.runtime.prefetch import normalize_images
from pixio.runtime.vis import PCAColors, mae_reconstruction, to_pixels
from pixio.visualize import (
    Loaded,
    as_image,
    load_images,
    main,
    patch_features,
    pca_rows,
    reconstruct_rows,
    similarity_rows,
)

RESIZE = Resize("short", (64, 64), 16)


def draw(command: str, checkpoint: Path, folder: Path, out: Path, *extra: str) -> None:
    main([command, *ARCH_FLAGS, "--checkpoint", str(checkpoint), "--images", str(folder),
          "--out", str(out), "--size", "64", "--device", "cpu", *extra])  # fmt: skip


def test_resize_policies_by_hand() -> None:
    short = Resize("short", (32, 32), 16)
    assert short.place(100, 50) == Placement((100, 50), (64, 32), (0, 0, 64, 32))
    # 50 x 130 -> 32 x 83 (short side exact), height cropped to 80, 1 pixel off the top
    tall = short.place(50, 130)
    assert tall == Placement((50, 130), (32, 83), (0, 1, 32, 81))
    assert tall.to_input(25.0, 65.0) == pytest.approx((16.0, 65 * 83 / 130 - 1))
    fixed = Resize.parse("32x48", "fixed", 16)
    assert fixed.place(100, 50) == Placement((100, 50), (48, 32), (0, 0, 48, 32))
    with pytest.raises(ValueError, match="takes one side"):
        Resize.parse("32x48", "short", 16)


def test_pca_colors_by_hand() -> None:
    """Features on one line through the mean: the first component is that line, the colour of
    channel 0 runs from 0 (the lowest projection) to 1 (the highest)."""
    direction = torch.tensor([3.0, 4.0, 0.0, 0.0]) / 5
    steps = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    feats = steps[:, None] * direction + torch.tensor([1.0, 1.0, 1.0, 1.0])
    pca = PCAColors.fit(feats)
    assert torch.allclose(pca.comps[:, 0].abs(), direction, atol=1e-6)
    red = pca.colors(feats, (2, 3))[0].flatten()
    expected = (steps - steps.min()) / (steps.max() - steps.min())
    assert torch.allclose(red, expected if pca.comps[0, 0] > 0 else 1 - expected, atol=1e-6)


def _loaded(demo_folder) -> list[Loaded]:
    return load_images(str(demo_folder), RESIZE, 8)


def _features(checkpoints, images, block=-1) -> tuple[pixio.PixioEncoder, list[torch.Tensor]]:
    enc = pixio.load_encoder("pixio_vitt16", checkpoints["encoder"], **ARCH).eval()
    return enc, patch_features(enc, images, block, True, torch.device("cpu"))


def test_pca_bases_per_image_and_shared(demo_folder, checkpoints) -> None:
    images = _loaded(demo_folder)
    assert [i.name for i in images] == [
        "astronaut.jpg",
        "camera.png",
        "chelsea.jpg",
        "rocket.jpg",
        "sub/coffee.png",
    ]  # fmt: skip  (broken.jpg skipped)
    _, feats = _features(checkpoints, images)
    per_image = [row[1].image for row in pca_rows(images, feats, "per-image", 16)]
    for colors in per_image:  # each image spans its own colour range
        assert np.allclose(colors.reshape(-1, 3).min(0), 0) and np.allclose(
            colors.reshape(-1, 3).max(0), 1
        )
    shared = [row[1].image for row in pca_rows(images, feats, "shared", 16)]
    stacked = np.concatenate([c.reshape(-1, 3) for c in shared])
    assert np.allclose(stacked.min(0), 0) and np.allclose(stacked.max(0), 1)  # the set spans it
    pca = PCAColors.fit(torch.cat(feats))
    first = pca.colors(feats[0], (4, 4)).permute(1, 2, 0).numpy()  # one colour per patch
    assert np.allclose(shared[0][::16, ::16], first, atol=1e-6)


def test_similarity_maps_by_hand(demo_folder, checkpoints) -> None:
    images = _loaded(demo_folder)
    _, feats = _features(checkpoints, images)
    rows = similarity_rows(images, feats, 2, (1, 3), 16)  # query: chelsea.jpg, grid 4 x 7
    query_map = rows[2][1].image
    assert query_map.shape == (64, 112) and query_map[16 + 8, 48 + 8] == pytest.approx(1.0)
    # the query patch (row 1, col 3: pixels x 48-63, y 16-31) outlined in red inside its edge
    query, red = rows[2][0].image, np.array([1.0, 0.0, 0.0])
    edge = np.zeros((64, 112), bool)
    edge[16, 48:64] = edge[31, 48:64] = edge[16:32, 48] = edge[16:32, 63] = True
    assert np.all(query[edge] == red)
    assert np.array_equal(query[~edge], as_image(images[2].pixels)[~edge])
    assert np.array_equal(rows[0][0].image, as_image(images[0].pixels))  # no outline elsewhere
    target = feats[2][1 * 7 + 3]
    by_hand = torch.nn.functional.cosine_similarity(feats[4], target[None], dim=-1)  # coffee 6x4
    assert np.allclose(rows[4][1].image[::16, ::16], by_hand.reshape(6, 4).numpy(), atol=1e-6)


def test_reconstruction_keeps_visible_patches_and_predicts_masked(demo_folder, checkpoints) -> None:
    images = _loaded(demo_folder)[:2]
    mae = load_mae("pixio_vitt16", checkpoints["mae"], **ARCH, **DECODER).eval()
    rows = reconstruct_rows(mae, images, 0.75, 0, torch.device("cpu"))
    x = normalize_images(images[0].pixels[None])
    noise = torch.rand(1, 4, generator=torch.Generator().manual_seed(0))  # the picture's draw
    with torch.no_grad():
        out = mae(x, 0.75, noise)
    recon, pixel_mask = mae_reconstruction(x, out.pred, out.mask, 16, True)
    shown = rows[0][2].image
    assert np.allclose(shown, to_pixels(recon[0]).permute(1, 2, 0).numpy(), atol=1e-6)
    visible = pixel_mask[0, 0] == 0
    assert visible.sum() == 64 * 64 // 4  # 1 of 4 groups visible at 75 %
    assert np.allclose(shown[visible.numpy()], rows[0][0].image[visible.numpy()], atol=1e-6)
    target = pixio.patchify(x, 16)  # masked patches: prediction in image units (norm_pix_loss)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = pixio.unpatchify(out.pred * std + mean, 16, 4, 4)
    assert torch.allclose(recon[0][:, ~visible], by_hand[0][:, ~visible], atol=1e-5)
    masked = rows[0][1].image
    assert np.all(masked[~visible.numpy()] == 0.5)


@pytest.mark.parametrize(
    "command, extra",
    [
        ("pca", ["--basis", "shared"]),
        ("similarity", ["--point", "40,30"]),
        ("reconstruct", DECODER_FLAGS),
    ],
)
def test_commands_write_readable_png_grids(
    demo_folder, checkpoints, tmp_path, capsys, command, extra
) -> None:
    checkpoint = checkpoints["mae" if command == "reconstruct" else "encoder"]
    draw(command, checkpoint, demo_folder, tmp_path / "pictures", "--max-images", "3", *extra)
    captured = capsys.readouterr()
    assert "skipped broken.jpg: corrupt_image" in captured.err
    path = tmp_path / "pictures" / f"{command}.png"
    assert captured.out.strip() == f"wrote {path}"
    width, height = Image.open(path).size
    columns = 3 if command == "reconstruct" else 2
    assert width >= columns * 250 and height >= 3 * 250  # about 300 pixels per panel


def test_reconstruct_refuses_an_encoder_only_file(
    demo_folder, checkpoints, tmp_path, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_:
        draw("reconstruct", checkpoints["encoder"], demo_folder, tmp_path / "r.png")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert err.startswith("pixio.visualize: error: ") and "holds an encoder only" in err
    assert not (tmp_path / "r.png").exists()


def test_similarity_point_outside_the_input_is_one_line(
    demo_folder, checkpoints, tmp_path, capsys
) -> None:
    # astronaut.jpg is 96 x 80, resized to 77 x 64 and cropped to 64 x 64 from x = 6:
    # x = 2 in the stored image lands left of the crop.
    with pytest.raises(SystemExit) as exit_:
        draw(
            "similarity", checkpoints["encoder"], demo_folder, tmp_path / "s.png", "--point", "2,40"
        )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "--point 2,40: outside the part of astronaut.jpg" in err
