"""Heads (state-dict layout of DPT / Depth Anything and of the reference linear head, shapes,
gradients) and FrozenFeatures (block choice, the class-token concat, frozen)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pixio
from evaluation.features import FrozenFeatures, dpt_block_ids, linear_block_ids
from evaluation.heads import (
    DPTHead,
    LinearHead,
    build_head,
    convert_sync_bn,
    head_block_ids,
)


def dpt_expected_shapes(in_ch: int, out_ch: int) -> dict[str, tuple[int, ...]]:
    """The DPT / Depth Anything `DPTHead` state dict (features 256, out_channels 256/512/1024/
    1024, no BatchNorm, the multi-class `scratch.output_conv`), written out key by key."""
    levels, f = (256, 512, 1024, 1024), 256
    shapes: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(levels):
        shapes[f"projects.{i}.weight"], shapes[f"projects.{i}.bias"] = (c, in_ch, 1, 1), (c,)
    # ConvTranspose2d weights are (in, out, k, k); index 2 is an Identity (no parameters).
    shapes |= {"resize_layers.0.weight": (256, 256, 4, 4), "resize_layers.0.bias": (256,)}
    shapes |= {"resize_layers.1.weight": (512, 512, 2, 2), "resize_layers.1.bias": (512,)}
    shapes |= {"resize_layers.3.weight": (1024, 1024, 3, 3), "resize_layers.3.bias": (1024,)}
    for i, c in enumerate(levels, start=1):
        shapes[f"scratch.layer{i}_rn.weight"] = (f, c, 3, 3)  # bias=False
        for unit in ("resConfUnit1", "resConfUnit2"):
            for conv in ("conv1", "conv2"):
                shapes[f"scratch.refinenet{i}.{unit}.{conv}.weight"] = (f, f, 3, 3)
                shapes[f"scratch.refinenet{i}.{unit}.{conv}.bias"] = (f,)
        shapes[f"scratch.refinenet{i}.out_conv.weight"] = (f, f, 1, 1)
        shapes[f"scratch.refinenet{i}.out_conv.bias"] = (f,)
    shapes |= {"scratch.output_conv.0.weight": (f, f, 3, 3), "scratch.output_conv.0.bias": (f,)}
    shapes |= {"scratch.output_conv.2.weight": (out_ch, f, 1, 1), "scratch.output_conv.2.bias": (out_ch,)}  # fmt: skip
    return shapes


def test_dpt_state_dict_matches_the_dpt_depth_anything_layout():
    sd = DPTHead(in_channels=2 * 48, out_channels=150).state_dict()
    expected = dpt_expected_shapes(96, 150)
    assert sorted(sd) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_linear_head_loads_the_reference_sequential_and_computes_bn_then_conv():
    reference = nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 3, 1))
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
        reference[0].running_mean.normal_()
        reference[0].running_var.uniform_(0.5, 2.0)
    head = LinearHead(8, 3)
    head.load_state_dict(reference.state_dict())  # strict: same keys `0.*`, `1.*`
    head.eval()
    reference.eval()
    early, last = torch.randn(2, 8, 3, 5), torch.randn(2, 8, 3, 5)
    out = head([early, last], (48, 80))
    bn = reference[0]
    normed = (last - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)  # fmt: skip
    normed = normed * bn.weight[:, None, None] + bn.bias[:, None, None]
    by_hand = F.interpolate(reference[1](normed), (48, 80), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
    # only the last map is used; corners of an align_corners upsample are the source corners
    assert torch.equal(head([torch.zeros_like(early), last], (48, 80)), out)
    torch.testing.assert_close(out[..., 0, 0], reference[1](normed)[..., 0, 0])


@pytest.mark.parametrize("grid", [(6, 6), (3, 5)])
def test_dpt_output_shape_and_every_trained_parameter_gets_a_gradient(grid):
    torch.manual_seed(0)
    head = DPTHead(in_channels=32, out_channels=5, features=16, level_channels=(8, 16, 32, 32))
    feats = [torch.randn(2, 32, *grid) for _ in range(4)]
    size = (grid[0] * 16, grid[1] * 16)
    out = head(feats, size)
    assert out.shape == (2, 5, *size)
    out.square().mean().backward()
    trained = {n for n, p in head.named_parameters() if p.requires_grad}
    missing = sorted(n for n, p in head.named_parameters() if p.requires_grad and p.grad is None)
    assert missing == []  # DDP (find_unused_parameters=False) needs this
    # the one unit that never runs (the deepest level has no skip input) is frozen, not dropped
    frozen = {n for n, _ in head.named_parameters()} - trained
    assert frozen == {f"scratch.refinenet4.resConfUnit1.conv{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}  # fmt: skip


def test_dpt_fuses_at_8x_the_patch_grid_before_the_final_upsample():
    head = DPTHead(in_channels=32, out_channels=2, features=16, level_channels=(8, 16, 32, 32))
    seen = {}
    head.scratch.output_conv.register_forward_hook(lambda m, i, o: seen.update(shape=i[0].shape))
    head([torch.randn(1, 32, 3, 5) for _ in range(4)], (48, 80))
    assert seen["shape"][-2:] == (24, 40)  # 4x (reassemble) * 2x (last fusion)


def test_build_head_and_block_ids():
    dpt, linear = build_head("dpt", 1280, 1), build_head("linear", 1280, 150)
    assert dpt.projects[0].in_channels == 2560 and dpt.scratch.output_conv[2].out_channels == 1
    assert linear[0].num_features == 2560 and linear[1].out_channels == 150
    assert head_block_ids("dpt", 32) == [7, 15, 23, 31]
    assert head_block_ids("linear", 32) == [31]
    with pytest.raises(ValueError, match="linear, dpt"):
        build_head("mlp", 8, 1)


@pytest.mark.parametrize(
    "depth, ids",
    [(12, [2, 5, 8, 11]), (24, [5, 11, 17, 23]), (32, [7, 15, 23, 31]), (48, [11, 23, 35, 47])],
)
def test_dpt_block_ids_of_the_released_sizes(depth, ids):
    assert dpt_block_ids(depth) == ids
    assert linear_block_ids(depth) == [depth - 1]


def test_convert_sync_bn_is_a_no_op_without_a_process_group():
    head = LinearHead(4, 2)
    assert convert_sync_bn(head) is head and type(head[0]) is nn.BatchNorm2d


@pytest.fixture
def encoder4() -> pixio.PixioEncoder:
    torch.manual_seed(0)
    return pixio.build_encoder("pixio_vitt16", embed_dim=32, depth=4, num_heads=2, img_size=64)


def test_frozen_features_concat_patch_tokens_and_class_token_mean(encoder4):
    images = torch.randn(2, 3, 48, 80)  # non-square: grid 3 x 5
    maps = FrozenFeatures(encoder4, [1, 3])(images)
    ref = encoder4.features(images, [1, 3])
    for m, r in zip(maps, ref, strict=True):
        assert m.shape == (2, 64, 3, 5) and not m.requires_grad
        # patch tokens first, row-major over the grid
        assert torch.equal(m[:, :32].flatten(2).transpose(1, 2), r["patch_tokens_norm"])
        cls_mean = r["cls_tokens_norm"].mean(dim=1)  # (B, D), the same at every patch
        assert torch.equal(m[:, 32:], cls_mean[:, :, None, None].expand(-1, -1, 3, 5))


def test_frozen_features_stop_at_the_last_used_block_and_stay_frozen(encoder4):
    def boom(x):
        raise AssertionError("block 3 must not run")

    encoder4.blocks[3].forward = boom
    features = FrozenFeatures(encoder4, [0, 2])
    assert len(features(torch.randn(1, 3, 32, 32))) == 2
    features.train()
    assert not encoder4.training and not any(p.requires_grad for p in encoder4.parameters())
    with pytest.raises(ValueError, match="out of range"):
        FrozenFeatures(encoder4, [4])
