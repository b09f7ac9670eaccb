"""An exported folder loads as transformers' Pixio backbone (`PixioBackbone`, the class
`AutoBackbone` picks for a Pixio config) with feature maps equal to the encoder's normed patch
tokens; transformers' stage k is the output of block k - 1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests_helpers import assert_same_weights

import pixio
from pixio.hf import pixio_to_hf_state

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "PixioBackbone"):  # transformers < 5
    pytest.skip("this transformers has no PixioBackbone", allow_module_level=True)

SMALL_256 = dict(embed_dim=64, depth=2, num_heads=4)  # position table for 256 x 256, grid 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny encoder whose final norm is not at its initial value (weight 1, bias 0), so a
    backbone that left its own feature-map norm uninitialised would be seen."""
    torch.manual_seed(0)
    enc = pixio.build_encoder("pixio_vitt16", **SMALL_256).eval()
    with torch.no_grad():
        enc.norm.weight.uniform_(0.5, 1.5)
        enc.norm.bias.normal_(0.0, 0.1)
    folder = pixio.export_hf(enc, tmp_path_factory.mktemp("hf") / "pixio-tiny")
    return enc, folder


def _backbone(folder, out_indices):
    model, info = transformers.PixioBackbone.from_pretrained(
        folder, out_indices=out_indices, output_loading_info=True
    )
    return model.eval(), info


def _maps(enc: pixio.PixioEncoder, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Our normed patch tokens as (B, D, h, w) maps."""
    h, w = enc.patch_grid(x)
    return [
        f["patch_tokens_norm"].transpose(1, 2).reshape(x.shape[0], -1, h, w) for f in enc(x, blocks)
    ]


def test_backbone_feature_maps_equal_ours_at_256(exported) -> None:
    enc, folder = exported
    model, info = _backbone(folder, [1, 2])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x).feature_maps
    ours = _maps(enc, x, [0, 1])  # stage k = block k - 1
    assert [tuple(m.shape) for m in got] == [(2, 64, 16, 16)] * 2
    for theirs, mine in zip(got, ours, strict=True):
        assert (theirs - mine).abs().max() < 1e-5


def test_backbone_at_other_sizes_interpolates_like_ours(exported) -> None:
    """transformers' Pixio resizes the position table itself at any input (bicubic, float32,
    no antialias), as our encoder does: equal maps at multiples of 16, square or not."""
    enc, folder = exported
    model, _ = _backbone(folder, [2])
    for size in ((320, 320), (192, 384)):
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            (got,) = model(x).feature_maps
        (mine,) = _maps(enc, x, [1])
        assert got.shape == mine.shape and (got - mine).abs().max() < 1e-5


def test_auto_backbone_resolves_pixio_folders_to_pixio_backbone(exported) -> None:
    enc, folder = exported
    config = transformers.AutoConfig.from_pretrained(folder, out_indices=[2])
    assert transformers.AutoBackbone._model_mapping[type(config)] is transformers.PixioBackbone
    assert config.stage_names == ["stem", "stage1", "stage2"] and config.out_features == ["stage2"]


def test_auto_backbone_from_pretrained_local_folder(exported) -> None:
    """`AutoBackbone.from_pretrained(folder)` itself. Some transformers releases (5.25 among
    them) ask the Hub whether the name is a repository before reading anything, which refuses
    a local path (HFValidationError): that is recorded as an expected failure, and the README
    names `PixioBackbone.from_pretrained` for those releases."""
    from huggingface_hub.errors import HFValidationError

    enc, folder = exported
    try:
        model = transformers.AutoBackbone.from_pretrained(str(folder), out_indices=[1])
    except HFValidationError as err:
        pytest.xfail(f"transformers {transformers.__version__}: {str(err)[:80]}")
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        (got,) = model.eval()(x).feature_maps
    assert (got - _maps(enc, x, [0])[0]).abs().max() < 1e-5


def test_folder_layouts_load_back_into_our_encoder(exported, tmp_path) -> None:
    """The backbone layout and the older PixioModel-only layout both read back exactly."""
    enc, folder = exported
    keys = set(load_file(str(folder / "model.safetensors")))
    assert {"layernorm.weight", "pixio.layernorm.weight", "pixio.embeddings.cls_token"} <= keys
    assert_same_weights(pixio.load_encoder("pixio_vitt16", folder, **SMALL_256), enc)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (old / name).write_bytes((folder / name).read_bytes())
    save_file(pixio_to_hf_state(enc.state_dict()), str(old / "model.safetensors"))
    assert_same_weights(pixio.load_encoder("pixio_vitt16", old, **SMALL_256), enc)


def test_pixio_model_still_loads_the_backbone_layout(exported) -> None:
    enc, folder = exported
    model, info = transformers.PixioModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        last = enc(x, [-1])[0]
        ours = torch.cat([last["cls_tokens_norm"], last["patch_tokens_norm"]], 1)
        assert (model.eval()(pixel_values=x).last_hidden_state - ours).abs().max() < 1e-5
