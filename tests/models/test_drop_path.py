"""DropPath with its keep probability as a tensor: stochastic depth per sample (timm's rule),
out of the state dict, on the CPU even for a meta-device build."""

from __future__ import annotations

import torch

import pixio
from pixio.models.encoder import DropPath


def test_each_sample_is_dropped_or_scaled_by_one_over_keep():
    drop = DropPath(0.25).train()
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    out = drop(x)
    per_sample = out[:, 0, 0]
    assert per_sample.unique().tolist() == [0.0, torch.tensor(1 / 0.75).item()]  # float32
    assert (out == per_sample.view(-1, 1, 1)).all()  # one draw per sample
    assert abs((per_sample == 0).float().mean().item() - 0.25) < 0.03
    assert abs(out.mean().item() - 1.0) < 0.05  # unbiased


def test_identity_in_eval_and_at_rate_zero():
    x = torch.randn(8, 5, 4)
    assert DropPath(0.4).eval()(x) is x
    assert torch.equal(DropPath(0.0).train()(x), x)
    bf16 = x.to(torch.bfloat16)
    assert DropPath(0.0).train()(bf16).dtype == torch.bfloat16


def test_rates_are_linear_tensors_outside_the_state_dict_and_off_meta():
    with torch.device("meta"):
        mae = pixio.build_mae("pixio_vitt16", depth=3, drop_path=0.2, decoder_depth=1)
    keeps = [b.drop_path1.keep for b in mae.blocks]
    assert all(k.device.type == "cpu" and k.dtype == torch.float32 for k in keeps)
    torch.testing.assert_close(torch.stack(keeps), torch.tensor([1.0, 0.9, 0.8]))
    assert not any("drop_path" in k for k in mae.state_dict())
    assert not list(mae.blocks[0].drop_path1.buffers())
    plain = pixio.build_encoder("pixio_vitt16", depth=2, drop_path=0.0)
    assert isinstance(plain.blocks[1].drop_path1, torch.nn.Identity)  # no draws without it
