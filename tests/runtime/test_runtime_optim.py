"""AdamW parameter groups and the lr schedule (the pre-training recipe)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pixio.runtime import optim


class Named(nn.Module):
    """Covers each branch of the decay rule with known names."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 2, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 6, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.patch_embed = nn.Conv2d(3, 4, 2, 2)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.ones(4))  # 1-d without a `.bias` name: no decay
        self.gate_bias = nn.Parameter(torch.ones(2, 2))  # ends in "bias" but not ".bias": decay
        self.extra = nn.Module()
        self.extra.bias = nn.Parameter(torch.ones(2, 2))  # 2-d but named `.bias`: no decay
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_split_decay_exact_names() -> None:
    decay, no_decay = optim.split_decay(Named())
    assert sorted(decay) == sorted(
        ["cls_token", "pos_embed", "mask_token", "patch_embed.weight", "fc.weight", "gate_bias"]
    )
    assert sorted(no_decay) == sorted(
        ["patch_embed.bias", "norm.weight", "norm.bias", "fc.bias", "gamma", "extra.bias"]
    )


def test_param_groups_hold_the_right_tensors() -> None:
    model = Named()
    groups = optim.param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    ids = [{id(p) for p in g["params"]} for g in groups]
    named = dict(model.named_parameters())
    assert id(named["mask_token"]) in ids[1] and id(named["fc.bias"]) in ids[0]
    assert not any(id(p) in ids[0] | ids[1] for p in model.frozen.parameters())
    assert len(ids[0]) + len(ids[1]) == sum(p.requires_grad for p in model.parameters())


def test_param_groups_skip_empty_group() -> None:
    groups = optim.param_groups(nn.LayerNorm(4), weight_decay=0.05)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_build_optimizer_settings_and_step() -> None:
    model = Named()
    opt = optim.build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == 1e-3 for g in opt.param_groups)
    assert not opt.defaults["fused"]  # CPU parameters: the fused kernel is a CUDA default
    before = model.fc.weight.detach().clone()
    model.fc(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, 0.0),
        (0.5, 2.5e-4),  # 1e-3 * 0.5 / 2
        (1.0, 5e-4),
        (2.0, 1e-3),  # end of warmup: the peak
        (4.0, 1e-5 + 0.99e-3 * 0.5 * (1 + math.sqrt(0.5))),  # cos(pi/4)
        (6.0, 1e-5 + 0.99e-3 * 0.5),  # half way through the cosine
        (10.0, 1e-5),  # end of schedule: min_lr
        (12.0, 1e-5),  # past the end stays at min_lr
    ],
)
def test_lr_at_known_points(epoch: float, expected: float) -> None:
    lr = optim.lr_at(epoch, base_lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_at_reference_recipe_iteration() -> None:
    # ViT-H recipe: blr 2.5e-5, global batch 8192 -> 8e-4; 40 warmup epochs of 1605 iterations.
    base = optim.resolve_lr(None, 2.5e-5, 8192)
    assert base == pytest.approx(8e-4)
    epoch = 3 + 802 / 1605
    assert optim.lr_at(epoch, base, 0.0, 40, 400) == pytest.approx(8e-4 * epoch / 40)
    assert optim.lr_at(220, base, 0.0, 40, 400) == pytest.approx(4e-4)


def test_lr_at_without_warmup_starts_at_base() -> None:
    assert optim.lr_at(0.0, 1e-3, 0.0, 0, 10) == 1e-3


def test_resolve_lr_prefers_explicit_lr() -> None:
    assert optim.resolve_lr(3e-4, 1.5e-4, 4096) == 3e-4
    assert optim.resolve_lr(None, 1.5e-4, 512) == pytest.approx(3e-4)


def test_set_lr_respects_lr_scale() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.25}], lr=1.0)
    optim.set_lr(opt, 2e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 5e-4]


def test_poly_schedule_exact_values() -> None:
    # Depth heads: 10 % linear warmup, then poly 0.9 over the rest, to 0 at the end.
    s = optim.Schedule("poly", base_lr=2e-4, epochs=10, warmup_epochs=1)
    assert s(0) == 0.0 and s(0.5) == pytest.approx(1e-4, rel=1e-15) and s(1) == 2e-4
    assert s(5.5) == pytest.approx(2e-4 * 0.5**0.9, rel=1e-15)  # halfway through the decay
    assert s(10) == 0.0 and s(12) == 0.0
    # Segmentation heads: no warmup.
    seg = optim.Schedule("poly", base_lr=1e-4, epochs=4)
    assert seg(0) == 1e-4 and seg(1) == pytest.approx(1e-4 * 0.75**0.9, rel=1e-15)


def test_cosine_schedule_is_the_reference_formula_and_constant_holds() -> None:
    s = optim.Schedule("cosine", base_lr=1.0, epochs=10, warmup_epochs=2, min_lr=0.1)
    for epoch in (0.0, 0.3, 2.0, 5.5, 9.99, 10.0):
        assert s(epoch) == optim.lr_at(epoch, 1.0, 0.1, 2, 10)
    c = optim.Schedule("constant", base_lr=3.0, epochs=10, warmup_epochs=1)
    assert (c(0.5), c(1), c(9)) == (1.5, 3.0, 3.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        optim.Schedule("step", 1.0, 10)


def test_schedule_from_config_warmup_fraction_overrides_epochs() -> None:
    from pixio.runtime.config import OptimConfig

    o = OptimConfig(schedule="poly", warmup_epochs=40, warmup_fraction=0.1, poly_power=0.9)
    s = optim.schedule_from_config(o, base_lr=1e-4, epochs=60)
    assert (s.kind, s.warmup_epochs, s.epochs, s.power) == ("poly", pytest.approx(6.0), 60, 0.9)
    cos = optim.schedule_from_config(OptimConfig(warmup_epochs=40), base_lr=1e-3, epochs=400)
    assert (cos.kind, cos.warmup_epochs) == ("cosine", 40)


def test_decay_all_puts_every_trainable_parameter_in_one_decayed_group() -> None:
    model = Named()
    groups = optim.param_groups(model, weight_decay=0.01, decay_all=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }  # biases and norms included, the frozen layer not
