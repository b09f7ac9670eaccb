"""Encoder: sizes, feature API, position-embedding resize, initialisation, errors."""

import pytest
import torch

import pixio
from pixio.models.encoder import resize_pos_embed
from pixio.models.registry import ENCODER_SIZES

PUBLISHED_COUNTS = {
    "pixio_vitb16": 85_855_488,
    "pixio_vitl16": 303_377_408,
    "pixio_vith16": 631_013_120,
    "pixio_vit1b16": 1_361_515_008,
    "pixio_vit5b16": 5_440_939_008,
}
PUBLISHED_MAE_COUNTS = {
    "pixio_vith16": 733_075_968,
    "pixio_vit1b16": 1_463_708_928,
    "pixio_vit5b16": 5_543_919_360,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_encoder_parameter_counts_match_spec(name):
    with torch.device("meta"):
        enc = pixio.build_encoder(name)
    assert n_params(enc) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name", list(PUBLISHED_MAE_COUNTS))
def test_mae_parameter_counts_match_spec(name):
    with torch.device("meta"):
        mae = pixio.build_mae(name)
    assert n_params(mae) == PUBLISHED_MAE_COUNTS[name]


def test_small_sizes_have_requested_shapes():
    for name, (dim, depth, heads) in [
        ("pixio_vits16", (384, 12, 6)),
        ("pixio_vitt16", (192, 12, 3)),
    ]:
        with torch.device("meta"):
            enc = pixio.build_encoder(name)
        assert (enc.embed_dim, enc.depth, enc.blocks[0].attn.num_heads) == (dim, depth, heads)
        assert ENCODER_SIZES[name] == (dim, depth, heads)


def test_reference_state_dict_keys():
    with torch.device("meta"):
        enc = pixio.build_encoder("pixio_vitb16")
    keys = list(enc.state_dict())
    assert len(keys) == 150
    assert keys[:4] == [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    block = [k.removeprefix("blocks.0.") for k in keys if k.startswith("blocks.0.")]
    assert block == [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    assert keys[-2:] == ["norm.weight", "norm.bias"]
    assert enc.state_dict()["pos_embed"].shape == (1, 8 + 256, 768)


def test_block_structure_matches_spec(tiny_encoder):
    blk = tiny_encoder.blocks[0]
    assert blk.norm1.eps == 1e-6 and tiny_encoder.norm.eps == 1e-6
    assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.act.approximate == "none"
    assert blk.attn.qkv.bias is not None and isinstance(blk.ls1, torch.nn.Identity)


def test_feature_api_shapes_and_norm(tiny_encoder):
    x = torch.randn(2, 3, 64, 96)
    feats = tiny_encoder(x)
    assert len(feats) == tiny_encoder.depth
    f = feats[-1]
    assert f["cls_tokens"].shape == (2, 8, 64) and f["patch_tokens"].shape == (2, 24, 64)
    full = torch.cat([f["cls_tokens"], f["patch_tokens"]], dim=1)
    normed = torch.cat([f["cls_tokens_norm"], f["patch_tokens_norm"]], dim=1)
    torch.testing.assert_close(tiny_encoder.norm(full), normed)


def test_block_ids_select_in_requested_order(tiny_encoder):
    x = torch.randn(1, 3, 32, 32)
    all_feats = tiny_encoder(x)
    some = tiny_encoder(x, block_ids=[2, 0, -1])
    for got, i in zip(some, [2, 0, tiny_encoder.depth - 1], strict=True):
        torch.testing.assert_close(got["patch_tokens"], all_feats[i]["patch_tokens"])
    with pytest.raises(ValueError, match="block id 7"):
        tiny_encoder(x, block_ids=[7])


def test_embed_convenience(tiny_encoder):
    x = torch.randn(2, 3, 32, 48)
    out = tiny_encoder.embed(x)
    last = tiny_encoder(x, block_ids=[-1])[0]
    torch.testing.assert_close(out["embedding"], last["cls_tokens_norm"].mean(1))
    assert out["patch_map"].shape == (2, 64, 2, 3)
    torch.testing.assert_close(out["patch_map"][:, :, 1, 2], last["patch_tokens_norm"][:, 5])


def test_pos_embed_resize_identity_at_native_grid(tiny_encoder):
    table = tiny_encoder.pos_embed
    assert tiny_encoder.pos_embed_for((16, 16)) is table
    assert torch.equal(resize_pos_embed(table, (16, 16), (16, 16), 8), table)


def test_pos_embed_resize_matches_bicubic_and_keeps_class_rows(tiny_encoder):
    table = tiny_encoder.pos_embed.detach()
    out = tiny_encoder.pos_embed_for((14, 20)).detach()
    assert out.shape == (1, 8 + 14 * 20, 64)
    assert torch.equal(out[:, :8], table[:, :8])
    grid = table[:, 8:].reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(14, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 8:], ref.permute(0, 2, 3, 1).reshape(1, -1, 64))


def test_initialisation_follows_spec():
    torch.manual_seed(0)
    enc = pixio.build_encoder("pixio_vits16")
    qkv = enc.blocks[0].attn.qkv
    bound = (6 / (qkv.in_features + qkv.out_features)) ** 0.5
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(qkv.bias) == 0
    assert torch.equal(enc.norm.weight, torch.ones(384))
    w = enc.patch_embed.proj.weight
    fan = (6 / (w.shape[0] + w[0].numel())) ** 0.5
    assert w.abs().max() <= fan
    assert 0.015 < enc.cls_token.std() < 0.025 and 0.015 < enc.pos_embed.std() < 0.025


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="pixio_vitx16"), "valid choices: pixio_vitt16"),
        (dict(name="pixio_vitt16", img_size=250), "img_size 250 is not divisible"),
        (dict(name="pixio_vitt16", embed_dim=100), "not divisible by num_heads"),
        (dict(name="pixio_vitt16", depth=0), "depth must be a positive integer"),
        (dict(name="pixio_vitt16", drop_path=1.5), r"drop_path must be in \[0, 1\)"),
        (dict(name="pixio_vitt16", decoder_depth=2), "unknown override"),
    ],
)
def test_build_encoder_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pixio.build_encoder(**kwargs)


def test_input_not_divisible_by_patch_size(tiny_encoder):
    with pytest.raises(ValueError, match="input size 40x48 is not divisible by the patch size 16"):
        tiny_encoder(torch.randn(1, 3, 40, 48))


def test_drop_path_linear_over_depth():
    enc = pixio.build_encoder("pixio_vitt16", depth=5, drop_path=0.4)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in enc.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
