"""pixio.extract and pixio.visualize need no --model for a file that records its architecture;
a --model or --override that disagrees with it is one line naming the sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tools_helpers import ARCH, ARCH_FLAGS, DECODER

import pixio
from pixio.checkpoint import save_mae
from pixio.extract import main as extract_main
from pixio.visualize import main as visualize_main


def _extract(checkpoint: Path, images: Path, out: Path, *flags: str) -> None:
    extract_main([*flags, "--checkpoint", str(checkpoint), "--images", str(images),
                  "--out", str(out), "--size", "64", "--workers", "0"])  # fmt: skip


def _parts(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for part in sorted(out.glob("features-*.safetensors")):
        tensors |= {f"{part.name}:{k}": v for k, v in load_file(str(part)).items()}
    return tensors


def test_extract_without_model_equals_extract_with_it(demo_folder, checkpoints, tmp_path):
    _extract(checkpoints["encoder"], demo_folder, tmp_path / "bare")
    _extract(checkpoints["encoder"], demo_folder, tmp_path / "named", *ARCH_FLAGS)
    bare, named = _parts(tmp_path / "bare"), _parts(tmp_path / "named")
    assert bare and set(bare) == set(named)
    assert all(torch.equal(bare[k], named[k]) for k in bare)
    index = json.loads((tmp_path / "bare" / "index.json").read_text())
    assert index["model"] == "pixio_vitt16"


def test_a_model_that_disagrees_is_one_line(demo_folder, checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _extract(checkpoints["encoder"], demo_folder, tmp_path / "x", "--model", "pixio_vitt16",
                 "--override", "depth=3")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith("pixio.extract: error: ") and "asked for depth 3 (file: 2)" in err[0]
    assert not (tmp_path / "x").exists()


def test_visualize_pca_and_reconstruct_from_recorded_files(demo_folder, checkpoints, tmp_path, capsys):  # fmt: skip
    torch.manual_seed(0)
    full = save_mae(pixio.build_mae("pixio_vitt16", **ARCH, **DECODER), tmp_path / "mae.safetensors")  # fmt: skip
    for command, checkpoint in (("pca", checkpoints["encoder"]), ("reconstruct", full)):
        visualize_main([command, "--checkpoint", str(checkpoint), "--images", str(demo_folder),
                        "--out", str(tmp_path / command), "--size", "64", "--device", "cpu",
                        "--max-images", "2"])  # fmt: skip
        assert (tmp_path / command / f"{command}.png").is_file()
    assert "wrote" in capsys.readouterr().out
