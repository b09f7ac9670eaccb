"""Parallelism helpers: the DDP/FSDP choice, meta-device build + materialisation, seeded init."""

from __future__ import annotations

import pytest
import torch
from tests_helpers import TINY, TINY_DECODER, assert_same_weights

import pixio
from pixio.models.init import init_parameters, param_seed, rule_for
from pixio.runtime.parallel import choose_parallel, has_meta, materialize


@pytest.mark.parametrize(
    ("parallel", "numel", "world", "expected"),
    [
        ("auto", 5_440_000_000, 1, "none"),
        ("fsdp", 5_440_000_000, 1, "none"),
        ("auto", 733_000_000, 8, "ddp"),  # ViT-H MAE: 11.7 GB of fp32 weights + AdamW fit
        ("auto", 1_464_000_000, 8, "fsdp"),  # 1B MAE
        ("auto", 1_000_000_000, 8, "fsdp"),  # the threshold itself
        ("ddp", 5_440_000_000, 8, "ddp"),
        ("fsdp", 1000, 2, "fsdp"),
    ],
)
def test_choose_parallel_for_trainable_modules(parallel, numel, world, expected):
    assert choose_parallel(parallel, numel, world) == expected


@pytest.mark.parametrize(
    ("parallel", "numel", "param_bytes", "expected"),
    [
        ("auto", 5_440_000_000, 2, "fsdp"),  # the 5B teacher in bf16: 10.9 GB, sharded
        ("auto", 1_362_000_000, 2, "none"),  # a 1B encoder in bf16: 2.7 GB, replicated
        ("auto", 1_362_000_000, 4, "fsdp"),  # ... in fp32: 5.4 GB, sharded
        ("ddp", 5_440_000_000, 2, "none"),  # no gradients: DDP means replicated
        ("fsdp", 1000, 4, "fsdp"),
    ],
)
def test_choose_parallel_for_frozen_modules(parallel, numel, param_bytes, expected):
    assert choose_parallel(parallel, numel, 8, trainable=False, param_bytes=param_bytes) == expected


def test_choose_parallel_rejects_unknown():
    with pytest.raises(ValueError, match="parallel must be one of"):
        choose_parallel("zero3", 1024, 8)


def test_meta_build_then_materialise_equals_a_cpu_build():
    torch.manual_seed(3)
    cpu = pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER)
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER)
    assert has_meta(meta) and meta.init_seed == cpu.init_seed
    materialize(meta, torch.device("cpu"))
    assert not has_meta(meta)
    assert_same_weights(cpu, meta)


def test_init_follows_the_reference_distributions():
    torch.manual_seed(0)
    mae = pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER)
    sd = mae.state_dict()
    assert torch.equal(sd["blocks.0.norm1.weight"], torch.ones(64))
    assert torch.equal(sd["blocks.0.attn.qkv.bias"], torch.zeros(192))
    bound = (6 / (64 + 192)) ** 0.5  # xavier-uniform of a (192, 64) Linear
    w = sd["blocks.0.attn.qkv.weight"]
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert 0.015 < sd["pos_embed"].std() < 0.025 and sd["pos_embed"].abs().max() <= 2.0
    assert 0.015 < sd["decoder_pos_embed"].std() < 0.025
    fan_in = 3 * 16 * 16
    assert sd["patch_embed.proj.bias"].abs().max() <= fan_in**-0.5


def test_seeds_differ_per_parameter_and_base_seed():
    assert param_seed(0, "blocks.0.attn.qkv.weight") != param_seed(0, "blocks.1.attn.qkv.weight")
    assert param_seed(0, "pos_embed") != param_seed(1, "pos_embed")
    torch.manual_seed(0)
    a = pixio.build_encoder("pixio_vitt16", **TINY)
    torch.manual_seed(1)
    b = pixio.build_encoder("pixio_vitt16", **TINY)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    # Same base seed, different blocks: not copies of each other.
    assert not torch.equal(a.blocks[0].mlp.fc1.weight, a.blocks[1].mlp.fc1.weight)


def test_init_parameters_select_and_unknown_parameter():
    torch.manual_seed(0)
    mae = pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER)
    before = {k: v.clone() for k, v in mae.state_dict().items()}
    with torch.no_grad():
        for p in mae.parameters():
            p.zero_()
    n = init_parameters(mae, mae.init_seed, select=lambda name: name.startswith("decoder_"))
    assert n > 0
    assert torch.equal(mae.decoder_pred.weight, before["decoder_pred.weight"])
    assert torch.equal(mae.pos_embed, torch.zeros_like(mae.pos_embed))  # not selected
    with pytest.raises(ValueError, match="no initialisation rule for parameter 'x.scale'"):
        rule_for(torch.nn.Module(), "scale", "x.scale")
