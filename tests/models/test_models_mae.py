"""MAE: group masking invariants, decoder, loss, patchify, errors."""

import pytest
import torch

import pixio
from pixio.models.mae import masked_mse, pixel_targets
from pixio.models.masking import group_masking, group_patch_ids


def test_group_patch_ids_layout():
    ids = group_patch_ids(4, 8, 2)
    # Groups row-major over a 2x4 group grid; patches row-major inside each 2x2 group.
    assert ids[0].tolist() == [0, 1, 8, 9]
    assert ids[1].tolist() == [2, 3, 10, 11]
    assert ids[4].tolist() == [16, 17, 24, 25]
    assert sorted(ids.flatten().tolist()) == list(range(32))


@pytest.mark.parametrize("grid_hw", [(16, 16), (12, 20)])
def test_masking_invariants(grid_hw):
    h, w = grid_hw
    g = 4
    torch.manual_seed(1)
    m = group_masking(3, grid_hw, g, 0.75)
    n_groups = (h // g) * (w // g)
    len_keep = int(n_groups * 0.25)
    assert m.ids_keep.shape == (3, len_keep * g * g)
    assert torch.equal(m.mask.sum(1), torch.full((3,), float(h * w - len_keep * g * g)))
    groups = group_patch_ids(h, w, g)
    for b in range(3):
        visible = set(torch.nonzero(m.mask[b] == 0).flatten().tolist())
        assert visible == set(m.ids_keep[b].tolist())
        # every group is either fully visible or fully masked
        per_group = m.mask[b][groups].sum(1)
        assert set(per_group.tolist()) <= {0.0, float(g * g)}
        assert int((per_group == 0).sum()) == len_keep
        # ids_restore is a permutation that restores the original order
        assert sorted(m.ids_restore[b].tolist()) == list(range(h * w))
        ids_shuffle = torch.argsort(m.ids_restore[b])
        assert torch.equal(ids_shuffle[: len(m.ids_keep[b])], m.ids_keep[b])
        assert torch.equal(torch.gather(ids_shuffle, 0, m.ids_restore[b]), torch.arange(h * w))


def test_visible_tokens_are_gathered_group_by_group_in_noise_order():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])  # 2x2 groups of 2x2 patches on a 4x4 grid
    m = group_masking(1, (4, 4), 2, 0.5, noise=noise)
    # lowest noise first: group 1 then group 3
    assert m.ids_keep[0].tolist() == [2, 3, 6, 7, 10, 11, 14, 15]
    assert m.mask[0].tolist() == [1, 1, 0, 0] * 4


def test_same_noise_same_mask_and_output(tiny_mae):
    x = torch.randn(2, 3, 128, 128)
    noise = torch.rand(2, 4)
    a, b = tiny_mae(x, noise=noise), tiny_mae(x, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pred, b.pred) and a.loss == b.loss


def test_mae_output_shapes_non_square(tiny_mae):
    x = torch.randn(2, 3, 128, 192)  # 8x12 patch grid, 2x3 groups
    out = tiny_mae(x, mask_ratio=0.5)
    assert out.pred.shape == (2, 96, 768) and out.mask.shape == (2, 96)
    assert out.mask.sum(1).tolist() == [48.0, 48.0]
    assert out.loss_per_sample.shape == (2,)
    torch.testing.assert_close(out.loss, out.loss_per_sample.mean())


def test_loss_ignores_visible_patches(tiny_mae):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 128, 128)  # 8x8 patches, 2x2 groups of 4x4
    noise = torch.tensor([[0.1, 0.9, 0.8, 0.7]])  # keep group 0
    base = tiny_mae(x, mask_ratio=0.75, noise=noise)
    target = pixel_targets(x, 16, True)
    err = (base.pred - target).pow(2).mean(-1)
    masked = base.mask[0].bool()
    assert masked.tolist()[:8] == [False] * 4 + [True] * 4
    # Corrupting the prediction at visible patches leaves the loss unchanged.
    tampered = base.pred.clone()
    tampered[0, ~masked] += 100.0
    torch.testing.assert_close(masked_mse(tampered, target, base.mask)[0], base.loss)
    torch.testing.assert_close(base.loss, err[0, masked].mean())
    assert not torch.isclose(base.loss, err[0].mean())


def test_norm_pix_targets_use_unbiased_variance():
    x = torch.randn(1, 3, 16, 16)
    t = pixio.patchify(x, 16)[0, 0]
    expected = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
    torch.testing.assert_close(pixel_targets(x, 16, True)[0, 0], expected)
    torch.testing.assert_close(pixel_targets(x, 16, False)[0, 0], t)


def test_patchify_pixel_order_and_inverse():
    x = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    p = pixio.patchify(x, 16)
    assert p.shape == (2, 6, 768)
    # patch 4 = row 1, column 1; element (row p=2, col q=5, channel c=1)
    assert p[1, 4, (2 * 16 + 5) * 3 + 1] == x[1, 1, 16 + 2, 16 + 5]
    assert torch.equal(pixio.unpatchify(p, 16, 2, 3), x)


def test_mae_state_dict_has_reference_decoder_keys(tiny_mae):
    keys = set(tiny_mae.state_dict())
    for k in ["decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_norm.bias",
              "decoder_pred.weight", "decoder_blocks.1.attn.qkv.weight", "cls_token", "norm.weight"]:  # fmt: skip
        assert k in keys
    assert tiny_mae.decoder_pred.out_features == 768
    assert set(tiny_mae.encoder_state_dict()) == {
        k for k in keys if not k.startswith(("decoder_", "mask_token"))
    }


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_mask_ratio(tiny_mae, ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        tiny_mae(torch.randn(1, 3, 64, 64), mask_ratio=ratio)


def test_grid_not_dividing_patch_grid(tiny_mae):
    with pytest.raises(ValueError, match="mask_grid 4 does not divide the 4x6 patch grid"):
        tiny_mae(torch.randn(1, 3, 64, 96))


def test_bad_noise_shape(tiny_mae):
    with pytest.raises(ValueError, match="noise must have shape"):
        tiny_mae(torch.randn(2, 3, 64, 64), noise=torch.rand(2, 5))


def test_mask_ratio_zero_keeps_everything(tiny_mae):
    out = tiny_mae(torch.randn(1, 3, 64, 64), mask_ratio=0.0)
    assert out.mask.sum() == 0 and out.loss == 0
