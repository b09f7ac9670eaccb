"""LARS (pixio.runtime.optim, `optim.name=lars`): two steps of a tiny linear layer against updates
computed by hand, the groups the config builds, and the config check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pixio.runtime import optim
from pixio.runtime.config import ConfigError, OptimConfig, TrainConfig, check_optim


def tiny() -> nn.Linear:
    layer = nn.Linear(2, 1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))  # norm 5
        layer.bias.fill_(1.0)
    return layer


def step(opt: torch.optim.Optimizer, layer: nn.Linear, gw: list[float], gb: float) -> None:
    layer.weight.grad = torch.tensor([gw], dtype=torch.float64)
    layer.bias.grad = torch.tensor([gb], dtype=torch.float64)
    opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_two_steps_equal_the_hand_computed_updates(weight_decay):
    layer = tiny()
    opt = optim.build_lars(layer, lr=2.0, weight_decay=weight_decay)
    # Step 1 with g = (0.6, 0.8). wd 0: d = g, ||d|| = 1, trust ratio 0.001 * 5 / 1 = 0.005, so
    # mu = (0.003, 0.004). wd 0.1: d = g + 0.1 w = (0.9, 1.2), ||d|| = 1.5, ratio 0.005 / 1.5:
    # the same scaled d. w = (3, 4) - 2 mu. The bias is neither decayed nor scaled: mu = 0.5,
    # b = 1 - 2 * 0.5 = 0.
    step(opt, layer, [0.6, 0.8], 0.5)
    expected_w = [3 - 2 * 0.003, 4 - 2 * 0.004]
    torch.testing.assert_close(layer.weight, torch.tensor([expected_w], dtype=torch.float64), rtol=0, atol=1e-12)  # fmt: skip
    torch.testing.assert_close(layer.bias, torch.tensor([0.0], dtype=torch.float64), rtol=0, atol=1e-12)  # fmt: skip
    if weight_decay:
        return
    # Step 2, same gradients: w = 0.998 (3, 4), ||w|| = 4.99, ratio 0.00499, d = (0.002994,
    # 0.003992), mu = 0.9 (0.003, 0.004) + d = (0.005694, 0.007592); bias mu = 0.95, b = -1.9.
    step(opt, layer, [0.6, 0.8], 0.5)
    expected = torch.tensor([[2.994 - 2 * 0.005694, 3.992 - 2 * 0.007592]], dtype=torch.float64)
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias, torch.tensor([-1.9], dtype=torch.float64), rtol=0, atol=1e-12)  # fmt: skip


def test_a_zero_norm_weight_takes_the_plain_gradient():
    layer = tiny()
    with torch.no_grad():
        layer.weight.zero_()
    opt = optim.build_lars(layer, lr=1.0, weight_decay=0.0)
    step(opt, layer, [0.6, 0.8], 0.0)  # ||p|| = 0: trust ratio 1, not 0 (or NaN)
    torch.testing.assert_close(layer.weight, torch.tensor([[-0.6, -0.8]], dtype=torch.float64))
    step(opt, layer, [0.0, 0.0], 0.0)  # ||d|| = 0: ratio 1, momentum carries on (0.9 mu)
    torch.testing.assert_close(layer.weight, torch.tensor([[-1.14, -1.52]], dtype=torch.float64))


def test_the_config_names_the_optimiser_and_its_groups():
    model = nn.Sequential(nn.BatchNorm1d(4, affine=True), nn.Linear(4, 3))
    adamw = optim.optimizer_from_config(model, OptimConfig(), 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    lars = optim.optimizer_from_config(model, OptimConfig(name="lars", weight_decay=0.0), 6.4)
    assert isinstance(lars, optim.LARS)
    groups = [(g["adapt"], g["weight_decay"], len(g["params"])) for g in lars.param_groups]
    # BatchNorm weight/bias and the Linear bias: no adaptation; the Linear weight adapts.
    assert groups == [(False, 0.0, 3), (True, 0.0, 1)]
    assert lars.param_groups[1]["params"][0] is model[1].weight
    assert all(g["lr"] == 6.4 and g["momentum"] == 0.9 and g["trust_coefficient"] == 1e-3 for g in lars.param_groups)  # fmt: skip


def test_config_check_names_the_key():
    with pytest.raises(ConfigError, match="optim.name: must be one of adamw, lars; got 'sgd'"):
        check_optim(OptimConfig(name="sgd"), TrainConfig())
    with pytest.raises(ConfigError, match="optim.decay_all: applies to adamw"):
        check_optim(OptimConfig(name="lars", decay_all=True), TrainConfig())
    check_optim(OptimConfig(name="lars", weight_decay=0.0), TrainConfig())
