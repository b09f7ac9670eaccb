"""torch.hub (hubconf.py) and timm (`timm.create_model("pixio_*")`) give the encoder that
`pixio.load_encoder` gives: same weights, same outputs, from every local format."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from tests_helpers import assert_same_weights

import pixio
from pixio.hub import EncoderOnlyCheckpointError, hub_entries
from pixio.timm_models import PixioTimmEncoder

REPO = str(Path(__file__).resolve().parents[2])
SMALL = dict(embed_dim=64, depth=2, num_heads=4, img_size=64)
SMALL_DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mask_grid=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """A tiny trained-looking encoder (final norm not at its initial value) in every format."""
    torch.manual_seed(0)
    enc = pixio.build_encoder("pixio_vitt16", **SMALL).eval()
    with torch.no_grad():
        enc.norm.weight.uniform_(0.5, 1.5)
        enc.norm.bias.normal_(0.0, 0.1)
    root = tmp_path_factory.mktemp("weights")
    mae = pixio.build_mae("pixio_vitt16", **SMALL, **SMALL_DECODER).eval()
    torch.save({"model": {"mae": mae.state_dict()}}, root / "pretrain.pth")
    files = {
        "safetensors": pixio.save_encoder(enc, root / "enc.safetensors"),
        "pth": pixio.save_encoder(enc, root / "enc.pth"),
        "hf": pixio.export_hf(enc, root / "hf"),
    }
    torch.save({"model": {"student": enc.state_dict()}}, root / "train.pth")
    return {"enc": enc, "mae": mae, "files": files, "root": root}


def _images(h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


# ---- torch.hub -------------------------------------------------------------------------------
def test_hub_entries_cover_every_registry_size() -> None:
    sizes = [n.removeprefix("pixio_") for n in pixio.list_models()]
    expected = {f"pixio_{s}" for s in sizes} | {f"pixio_mae_{s}" for s in sizes}
    assert set(hub_entries()) == expected
    hubconf = torch.hub._import_module("hubconf", str(Path(REPO) / "hubconf.py"))
    public = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}
    assert public == expected  # what torch.hub can load, nothing else
    assert hubconf.dependencies == ["torch", "timm", "safetensors", "numpy"]


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "hf"])
def test_hub_load_equals_load_encoder(weights, fmt: str) -> None:
    path = weights["files"][fmt]
    got = torch.hub.load(REPO, "pixio_vitt16", source="local", weights=str(path), **SMALL)
    ref = pixio.load_encoder("pixio_vitt16", path, **SMALL)
    assert type(got) is pixio.PixioEncoder
    assert_same_weights(got, ref)
    assert_same_weights(got, weights["enc"])
    x = _images()
    with torch.no_grad():
        a, b = got.eval()(x, [0, 1]), ref.eval()(x, [0, 1])
    for fa, fb in zip(a, b, strict=True):
        assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_hub_training_checkpoint_module_and_random_build(weights) -> None:
    path = weights["root"] / "train.pth"
    got = torch.hub.load(
        REPO, "pixio_vitt16", source="local", weights=str(path), module="student", **SMALL
    )
    assert_same_weights(got, weights["enc"])
    fresh = torch.hub.load(REPO, "pixio_vitl16", source="local", depth=1, img_size=32)
    assert type(fresh) is pixio.PixioEncoder and fresh.depth == 1 and fresh.embed_dim == 1024


def test_hub_mae_loads_full_pretraining_checkpoint(weights) -> None:
    path = weights["root"] / "pretrain.pth"
    got = torch.hub.load(
        REPO, "pixio_mae_vitt16", source="local", weights=str(path), **SMALL, **SMALL_DECODER
    )
    assert type(got) is pixio.PixioMAE
    assert_same_weights(got, weights["mae"])
    x, noise = _images(64, 64), torch.rand(2, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(got.eval()(x, 0.75, noise).pred, weights["mae"](x, 0.75, noise).pred)


def test_hub_mae_refuses_an_encoder_only_file_in_one_line(weights) -> None:
    path = weights["files"]["safetensors"]
    with pytest.raises(EncoderOnlyCheckpointError) as err:
        torch.hub.load(
            REPO, "pixio_mae_vitt16", source="local", weights=str(path), **SMALL, **SMALL_DECODER
        )
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "encoder only" in message


# ---- timm ------------------------------------------------------------------------------------
def _timm(path, **kwargs) -> torch.nn.Module:
    overlay = {"file": str(path)}
    return timm.create_model(
        "pixio_vitt16", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL, **kwargs
    ).eval()


def test_timm_registers_every_size_with_the_reference_preprocessing() -> None:
    assert set(timm.list_models("pixio_*")) == set(pixio.list_models())
    model = timm.create_model("pixio_vitt16", **SMALL)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 256, 256) and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 1.0 and cfg["num_classes"] == 0
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (
        0.229,
        0.224,
        0.225,
    )
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 256, 256) and data["crop_pct"] == 1.0
    assert model.num_features == 64 and model.num_classes == 0 and model.num_prefix_tokens == 8


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "hf"])
def test_timm_pretrained_equals_load_encoder(weights, fmt: str) -> None:
    path = weights["files"][fmt]
    model = _timm(path)
    ref = pixio.load_encoder("pixio_vitt16", path, **SMALL).eval()
    assert isinstance(model, PixioTimmEncoder) and model.pretrained_cfg["file"] == str(path)
    assert_same_weights(model, ref)  # same keys: a timm model's state dict is a Pixio checkpoint
    x = _images()  # 64 x 96: not the 64 x 64 of the position table (dynamic size)
    with torch.no_grad():
        last = ref(x, [-1])[0]
        assert torch.equal(model(x), ref.embed(x)["embedding"])  # pool "token": mean of 8 cls
        tokens = torch.cat([last["cls_tokens_norm"], last["patch_tokens_norm"]], 1)
        assert torch.equal(model.forward_features(x), tokens)
        assert torch.equal(model.forward_head(tokens, pre_logits=True), model(x))


def test_timm_training_checkpoint_picks_its_module(weights) -> None:
    model = _timm(weights["root"] / "train.pth", checkpoint_module="student")
    assert_same_weights(model, weights["enc"])


@pytest.mark.parametrize(
    "indices, blocks", [(None, [0, 1]), (1, [1]), ([0], [0]), ([-1, 0], [1, 0]), ((1,), [1])]
)
@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_match_the_feature_api(weights, indices, blocks, norm) -> None:
    model = _timm(weights["files"]["safetensors"])
    x = _images()
    suffix = "_norm" if norm else ""
    with torch.no_grad():
        ref = weights["enc"](x, blocks)
        final, maps = model.forward_intermediates(x, indices, norm=norm)
        nlc = model.forward_intermediates(
            x, indices, norm=norm, output_fmt="NLC", intermediates_only=True
        )
        pairs = model.forward_intermediates(
            x, indices, norm=norm, return_prefix_tokens=True, intermediates_only=True
        )
    assert torch.equal(final, model.forward_features(x))
    assert len(maps) == len(nlc) == len(pairs) == len(blocks)
    for f, m, t, (p, c) in zip(ref, maps, nlc, pairs, strict=True):
        assert torch.equal(t, f["patch_tokens" + suffix])  # (B, h*w, D)
        assert m.shape == (2, 64, 4, 6)  # (B, D, h, w)
        assert torch.equal(m, f["patch_tokens" + suffix].transpose(1, 2).reshape(2, 64, 4, 6))
        assert torch.equal(p, m) and torch.equal(c, f["cls_tokens" + suffix])


def test_features_only_prunes_and_matches(weights) -> None:
    model = _timm(weights["files"]["pth"], features_only=True, out_indices=(0,))
    assert model.feature_info.channels() == [64] and model.feature_info.reduction() == [16]
    x = _images()
    with torch.no_grad():
        (got,) = model(x)
        ref = weights["enc"](x, [0])[0]["patch_tokens"]
    assert len(model.model.blocks) == 1  # blocks after the last asked are dropped
    assert torch.equal(got, ref.transpose(1, 2).reshape(2, 64, 4, 6))


def test_classifier_head_and_pooling(weights) -> None:
    model = _timm(weights["files"]["safetensors"], num_classes=5)
    x = _images()
    assert model(x).shape == (2, 5) and set(model.get_classifier().state_dict()) == {
        "weight",
        "bias",
    }
    model.reset_classifier(0, global_pool="avg")
    with torch.no_grad():
        patches = weights["enc"](x, [-1])[0]["patch_tokens_norm"]
        assert torch.equal(model(x), patches.mean(1))
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 8 + 24, 64)


def test_timm_refusals_are_one_line(weights, tmp_path) -> None:
    with pytest.raises(ValueError, match="needs local weights"):
        timm.create_model("pixio_vitt16", pretrained=True)
    deeper = pixio.save_encoder(
        pixio.build_encoder("pixio_vitt16", **{**SMALL, "depth": 3}), tmp_path / "d3.pth"
    )
    with pytest.raises(ValueError, match=r"the model has depth 2 \(file: 3\)$") as err:
        _timm(deeper)  # the differing size, not a list of keys
    assert "\n" not in str(err.value) and str(deeper) in str(err.value)
    with pytest.raises(ValueError, match="dynamic_img_size=False"):
        timm.create_model("pixio_vitt16", dynamic_img_size=False, **SMALL)
    with pytest.raises(ValueError, match="in_chans=3"):
        timm.create_model("pixio_vitt16", in_chans=1, **SMALL)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        timm.create_model("pixio_vitt16", **SMALL)(torch.zeros(1, 3, 64, 72))
