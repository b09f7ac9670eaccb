"""Parameter initialisation that does not depend on how or where a model is built.

Each parameter is drawn from its own generator, seeded by (the model's `init_seed`, the
parameter's qualified name), so the values are the same whether the model is built on the CPU
in one process, or built on the meta device, sharded with FSDP and materialised rank by rank:
every rank computes a parameter's full value on the CPU (one parameter at a time: at most
151 MB for the 5B model's largest matrix) and keeps its own shard. The rules are the reference
ones: xavier-uniform Linears (and the patch embedding, as the Linear it is) with zero bias,
LayerNorm (1, 0), position tables trunc-normal(0.02), class and mask tokens normal(0.02).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
from torch import nn

Rule = Callable[[torch.Tensor, torch.Generator], None]


def draw_init_seed() -> int:
    """A base seed for a new model, drawn from torch's global generator (so `manual_seed`
    before building a model fixes its weights)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu").item())


def param_seed(base_seed: int, name: str) -> int:
    """The seed of parameter `name`: stable across processes and Python runs."""
    return (base_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _xavier(t: torch.Tensor, g: torch.Generator) -> None:
    nn.init.xavier_uniform_(t.view(t.shape[0], -1), generator=g)


def _conv_bias(fan_in: int) -> Rule:
    bound = 1.0 / math.sqrt(fan_in)  # PyTorch's Conv2d default, kept by the reference
    return lambda t, g: t.uniform_(-bound, bound, generator=g)


def rule_for(module: nn.Module, pname: str, full_name: str) -> Rule:
    """The initialisation of parameter `pname` of `module`; ValueError if none is known."""
    if isinstance(module, (nn.Linear, nn.Conv2d)) and pname == "weight":
        return _xavier
    if isinstance(module, nn.Linear) and pname == "bias":
        return lambda t, g: t.zero_()
    if isinstance(module, nn.Conv2d) and pname == "bias":
        return _conv_bias(module.weight[0].numel())
    if isinstance(module, nn.LayerNorm):
        return (lambda t, g: t.fill_(1.0)) if pname == "weight" else (lambda t, g: t.zero_())
    if pname.endswith("pos_embed"):
        return lambda t, g: nn.init.trunc_normal_(t, std=0.02, generator=g)
    if pname.endswith("token"):
        return lambda t, g: t.normal_(0.0, 0.02, generator=g)
    raise ValueError(
        f"no initialisation rule for parameter {full_name!r} ({type(module).__name__})"
    )


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full value into `param`; for a sharded (DTensor) parameter only the local shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full value; slice it, no communication.
        local = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(value)


@torch.no_grad()
def init_parameters(
    model: nn.Module, base_seed: int, select: Callable[[str], bool] | None = None
) -> int:
    """Initialise every parameter of `model` (those `select(name)` accepts) from its own seeded
    generator. Meta parameters are left alone (build on meta, materialise, then call this).
    Returns how many parameters were initialised."""
    done = 0
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if param.is_meta or (select is not None and not select(name)):
                continue
            gen = torch.Generator().manual_seed(param_seed(base_seed, name))
            value = torch.empty(param.shape, dtype=torch.float32)  # full (global) shape
            rule_for(module, pname, name)(value, gen)
            _assign(param, value.to(param.dtype))
            done += 1
    return done
