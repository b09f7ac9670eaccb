r"""Pictures of what a Pixio encoder sees in your own images, as titled PNG grids.

    python -m pixio.visualize pca --checkpoint encoder.safetensors --images photos/ \
        --out pca.png [--basis per-image|shared] [--block -1]
    python -m pixio.visualize similarity --model pixio_vith16 --checkpoint enc.pth \
        --images photos/ --out sim.png (--patch ROW,COL | --point X,Y) [--query NAME]
    python -m pixio.visualize reconstruct --checkpoint run/checkpoint-last \
        --images photos/ --out recon.png [--mask-ratio 0.75] [--seed 0]

pca: the patch features' first three principal components as RGB, fitted per image or on the
whole set (`shared`: the same colour means the same feature across images). similarity: the
cosine similarity of every patch of every image to one patch of the query image (the first,
or `--query`), given as a patch (`--patch ROW,COL`) or a pixel of the stored image (`--point
X,Y`). reconstruct: the pre-training model's masked-patch reconstruction (needs a checkpoint
with the decoder: a pre-training checkpoint directory or a full file of `python -m pixio.convert
--full`). `--model` / `--override` only for a checkpoint that does not record its architecture
(a reference `.pth`, a Hugging Face folder). `--out` is a .png file, or a folder that gets `<command>.png`. Unreadable
images are skipped and named on stderr.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixio.checkpoint import read_architecture
from pixio.data.images import DecodeError, load_rgb
from pixio.hub import load_mae
from pixio.inference import (
    Placement,
    Resize,
    add_encoder_args,
    add_image_args,
    encoder_build,
    list_images,
    load_frozen_encoder,
    run_cli,
)
from pixio.models.registry import encoder_kwargs
from pixio.runtime.prefetch import normalize_images
from pixio.runtime.vis import (
    MASK_GREY,
    Panel,
    PCAColors,
    mae_reconstruction,
    render_panels,
    save_png,
    to_pixels,
    upsample_nearest,
)

PANEL_PX = 300  # shorter side of a panel in the PNG, pixels
MAX_IMAGES = 8
BOX_RGB = (1.0, 0.0, 0.0)  # the query patch's outline


@dataclass
class Loaded:
    """One image as the encoder gets it."""

    name: str  # path relative to --images
    pixels: torch.Tensor  # uint8 (3, H, W)
    placement: Placement


# ---- inputs --------------------------------------------------------------------------------------
def load_images(folder: str, resize: Resize, limit: int) -> list[Loaded]:
    """The first `limit` usable images of `folder`; the unusable ones are named on stderr."""
    root = Path(folder).expanduser()
    loaded: list[Loaded] = []
    for path in list_images(root):
        if len(loaded) == limit:
            break
        name = path.relative_to(root).as_posix()
        try:
            pixels, placement = resize.apply(load_rgb(path.read_bytes()))
        except (DecodeError, OSError) as err:
            print(f"pixio.visualize: skipped {name}: {err}", file=sys.stderr)
            continue
        loaded.append(Loaded(name, pixels, placement))
    if not loaded:
        raise ValueError(f"--images {folder}: no usable image")
    return loaded


def pick_device(want: str) -> torch.device:
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@torch.no_grad()
def patch_features(
    encoder: torch.nn.Module, images: list[Loaded], block: int, norm: bool, device: torch.device
) -> list[torch.Tensor]:
    """Per image, the patch tokens (h*w, D) of `block` (one image at a time: sizes differ)."""
    key = "patch_tokens_norm" if norm else "patch_tokens"
    out = []
    for item in images:
        x = normalize_images(item.pixels[None].to(device))
        out.append(encoder(x, [block])[0][key][0].float().cpu())
    return out


def as_image(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] (or uint8) -> (H, W, 3) float array."""
    if pixels.dtype == torch.uint8:
        pixels = pixels.float() / 255.0
    return pixels.permute(1, 2, 0).numpy()


def outline(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A copy of (H, W, 3) [0, 1] `image` with box (x0, y0, x1, y1) (pixels, end exclusive)
    outlined in BOX_RGB along its inner edge; the line is 1 pixel wide per 128 of the shorter
    side, so it stays visible once the panel is scaled to PANEL_PX."""
    out, (x0, y0, x1, y1) = image.copy(), box
    w = max(1, min(image.shape[:2]) // 128)
    for rows, cols in ((slice(y0, y0 + w), slice(x0, x1)), (slice(y1 - w, y1), slice(x0, x1)),
                       (slice(y0, y1), slice(x0, x0 + w)), (slice(y0, y1), slice(x1 - w, x1))):  # fmt: skip
        out[rows, cols] = BOX_RGB
    return out


# ---- the three pictures --------------------------------------------------------------------------
def pca_rows(
    images: list[Loaded], feats: list[torch.Tensor], basis: str, patch: int
) -> list[list[Panel]]:
    """Per image: input | its patch features as the RGB of three principal components."""
    shared = PCAColors.fit(torch.cat(feats)) if basis == "shared" else None
    rows = []
    for item, tokens in zip(images, feats, strict=True):
        height, width = item.pixels.shape[1:]
        pca = shared or PCAColors.fit(tokens)
        colors = pca.colors(tokens, (height // patch, width // patch))
        rows.append([
            Panel(as_image(item.pixels), f"{item.name} ({height}x{width})"),
            Panel(as_image(upsample_nearest(colors, height, width)), f"PCA ({basis} basis)"),
        ])  # fmt: skip
    return rows


def query_patch(args: argparse.Namespace, item: Loaded, patch: int) -> tuple[int, int]:
    """(row, col) of the query patch in the query image's grid; ValueError when outside."""
    height, width = item.pixels.shape[1:]
    if args.patch is not None:
        row, col = _pair(args.patch, "--patch")
    else:
        x, y = item.placement.to_input(*_pair(args.point, "--point"))
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"--point {args.point}: outside the part of {item.name} the encoder sees "
                f"after resizing and cropping"
            )
        row, col = int(y // patch), int(x // patch)
    if not (0 <= row < height // patch and 0 <= col < width // patch):
        raise ValueError(
            f"--patch {row},{col}: outside the {height // patch}x{width // patch} patch grid "
            f"of {item.name}"
        )
    return row, col


def similarity_rows(
    images: list[Loaded], feats: list[torch.Tensor], query: int, rc: tuple[int, int], patch: int
) -> list[list[Panel]]:
    """Per image: input | cosine similarity of its patches to the query patch."""
    q_item, (row, col) = images[query], rc
    q_width = q_item.pixels.shape[2] // patch
    target = feats[query][row * q_width + col]  # (D,)
    box = (col * patch, row * patch, (col + 1) * patch, (row + 1) * patch)
    rows = []
    for i, (item, tokens) in enumerate(zip(images, feats, strict=True)):
        height, width = item.pixels.shape[1:]
        sim = torch.nn.functional.cosine_similarity(tokens, target[None], dim=-1)  # (h*w,)
        grid = sim.reshape(1, height // patch, width // patch)
        title, image = item.name, as_image(item.pixels)
        if i == query:
            title, image = f"query: {item.name}", outline(image, box)
        sim_map = upsample_nearest(grid, height, width)[0].numpy()
        rows.append(
            [Panel(image, title), Panel(sim_map, "cosine similarity", -1.0, 1.0, colorbar="")]
        )
    return rows


@torch.no_grad()
def reconstruct_rows(
    mae: torch.nn.Module, images: list[Loaded], ratio: float, seed: int, device: torch.device
) -> list[list[Panel]]:
    """Per image: input | masked input (grey) | reconstruction, with the masked-patch loss."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for item in images:
        x = normalize_images(item.pixels[None].to(device))
        h, w = mae.patch_grid(x)
        groups = (h // mae.mask_grid) * (w // mae.mask_grid)
        out = mae(x, ratio, torch.rand(1, groups, generator=generator).to(device))
        recon, pixel_mask = mae_reconstruction(
            x.cpu(), out.pred.float().cpu(), out.mask.cpu(), mae.patch_size, mae.norm_pix_loss
        )
        original = as_image(item.pixels)
        masked = np.where(as_image(pixel_mask[0]) > 0, MASK_GREY, original)
        rows.append([
            Panel(original, item.name),
            Panel(masked, f"masked ({ratio:.0%})"),
            Panel(as_image(to_pixels(recon[0])), f"reconstruction (loss {out.loss.item():.3f})"),
        ])  # fmt: skip
    return rows


# ---- the command ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pixio.visualize", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    pca = _command(commands, "pca", "patch features as RGB (first three principal components)")
    pca.add_argument("--basis", default="per-image", choices=["per-image", "shared"])
    sim = _command(commands, "similarity", "cosine similarity to one patch of the query image")
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--patch", help="ROW,COL of the query patch in the patch grid")
    where.add_argument("--point", help="X,Y in pixels of the stored query image")
    sim.add_argument("--query", help="the query image (relative path); default: the first")
    rec = _command(commands, "reconstruct", "masked-patch reconstructions (full MAE checkpoint)")
    rec.add_argument("--mask-ratio", type=float, default=0.75)
    rec.add_argument("--seed", type=int, default=0, help="draws which patch groups are masked")
    return parser


def _command(commands: Any, name: str, text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=text, description=text)
    add_encoder_args(sub)
    sub.add_argument("--images", required=True, help="a folder of images (recursive)")
    sub.add_argument("--out", required=True, type=Path, help="a .png file, or a folder")
    add_image_args(sub)
    sub.add_argument("--max-images", type=int, default=MAX_IMAGES, help="rows of the grid")
    sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    if name != "reconstruct":
        sub.add_argument("--block", type=int, default=-1, help="which block's features")
        sub.add_argument(
            "--norm", action=argparse.BooleanOptionalAction, default=True,
            help="final norm applied to the features (default)",
        )  # fmt: skip
    return sub


def _pair(text: str, flag: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected two integers A,B") from None
    return a, b


def output_path(out: Path, command: str) -> Path:
    """`--out`: a .png file as given, anything else a folder for `<command>.png`."""
    return out if out.suffix.lower() == ".png" else out / f"{command}.png"


def visualize(args: argparse.Namespace) -> Path:
    """Draw the picture of `args.command` and write it; returns the PNG's path."""
    if args.max_images < 1:
        raise ValueError(f"--max-images {args.max_images}: at least 1")
    device = pick_device(args.device)
    if args.command == "reconstruct":
        return _reconstruct(args, device)
    name, build = encoder_build(args.model, args.checkpoint, args.module, dict(args.override))
    patch = encoder_kwargs(name, **build)["patch_size"]
    images = load_images(args.images, Resize.parse(args.size, args.resize, patch), args.max_images)
    encoder = load_frozen_encoder(name, args.checkpoint, args.module, device, **build)
    feats = patch_features(encoder, images, args.block, args.norm, device)
    what = f"block {args.block % encoder.depth}{'' if args.norm else ', before the final norm'}"
    if args.command == "pca":
        rows = pca_rows(images, feats, args.basis, patch)
    else:
        query = _query_index(images, args.query)
        rc = query_patch(args, images[query], patch)
        rows = similarity_rows(images, feats, query, rc, patch)
        what += f", patch {rc[0]},{rc[1]} of {images[query].name}"
    title = f"{name} {args.command} ({what})"
    return save_png(render_panels(rows, title, PANEL_PX), output_path(args.out, args.command))


def _reconstruct(args: argparse.Namespace, device: torch.device) -> Path:
    """The pre-training model's pictures: images cropped to whole masking groups."""
    mae = load_mae(args.model, args.checkpoint, args.module, **dict(args.override))
    multiple = mae.patch_size * mae.mask_grid
    resize = Resize.parse(args.size, args.resize, multiple, "patch size x mask grid")
    images = load_images(args.images, resize, args.max_images)
    rows = reconstruct_rows(mae.to(device).eval(), images, args.mask_ratio, args.seed, device)
    name = args.model or (read_architecture(args.checkpoint, args.module, False) or {}).get("name")
    title = f"{name or 'Pixio MAE'} reconstructions ({args.checkpoint})"
    return save_png(render_panels(rows, title, PANEL_PX), output_path(args.out, args.command))


def _query_index(images: list[Loaded], name: str | None) -> int:
    if name is None:
        return 0
    names = [item.name for item in images]
    if name not in names:
        raise ValueError(f"--query {name}: not among the images shown ({', '.join(names)})")
    return names.index(name)


def main(argv: list[str] | None = None) -> None:
    print(f"wrote {run_cli('pixio.visualize', build_parser(), visualize, argv)}")


if __name__ == "__main__":
    main()
