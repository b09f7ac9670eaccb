"""Evaluation heads on frozen features: linear (BatchNorm + 1x1 conv) and DPT (see
docs/reproduction.md).

Both take the list of (B, 2D, h, w) maps of `evaluation.features.FrozenFeatures` and the output
size, and return logits (B, out, H, W) upsampled bilinearly (align_corners=True); size None
keeps the head's own resolution (the bins depth output forms its depth there first). Sigmoid *
max_depth (depth), the bins' weighted sum of centres (`bins_to_depth`) or softmax
(segmentation) is the caller's.

Parameter names follow the reference so its head weights load: the linear head is the
reference's `nn.Sequential(BatchNorm2d, Conv2d)` (`0.*`, `1.*`); the DPT head uses the DPT /
Depth Anything names (`projects.{0..3}`, `resize_layers.{0,1,3}`, `scratch.layer{1..4}_rn`,
`scratch.refinenet{1..4}.{out_conv,resConfUnit1,resConfUnit2}`, `scratch.output_conv.{0,2}`;
the full list is pinned in tests/evaluation/test_heads.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from evaluation.choices import BINS_NORMS, HEAD_KINDS
from evaluation.features import dpt_block_ids, linear_block_ids

DEPTH_BINS = 256  # the bins output's classes (DINOv2's linear depth protocol)
BINS_EPS = 0.1  # the "linear" normalisation's floor (AdaBins, as DINOv2 uses it)


def upsample(x: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """Bilinear, align_corners=True (the reference's choice throughout the heads); size None:
    `x` unchanged (the head's own resolution)."""
    if size is None:
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def bin_centres(min_depth: float, max_depth: float, bins: int = DEPTH_BINS) -> torch.Tensor:
    """(bins,) depths spaced evenly from min_depth to max_depth, both included (DINOv2's "UD")."""
    return torch.linspace(min_depth, max_depth, bins)


def bins_to_depth(logits: torch.Tensor, centres: torch.Tensor, norm: str = "linear") -> torch.Tensor:  # fmt: skip
    """Depth (B, 1, h, w) from bin logits (B, bins, h, w): the sum of the bin centres weighted
    by the normalised logits. "linear" (DINOv2's default, after AdaBins): w = relu(l) + 0.1,
    divided by its sum over the bins; "softmax": w = softmax(l)."""
    if norm == "linear":
        weights = F.relu(logits) + BINS_EPS
        weights = weights / weights.sum(dim=1, keepdim=True)
    elif norm == "softmax":
        weights = torch.softmax(logits, dim=1)
    else:
        raise ValueError(f"bins norm must be one of {', '.join(BINS_NORMS)}, got {norm!r}")
    centres = centres.to(weights.dtype).view(1, -1, 1, 1)
    return (weights * centres).sum(dim=1, keepdim=True)


class LinearHead(nn.Sequential):
    """BatchNorm2d(in) -> Conv1x1(in, out) on the last feature map, upsampled to `size`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, features: list[torch.Tensor], size: tuple[int, int] | None) -> torch.Tensor:
        """features: [..., (B, in, h, w)] -> (B, out, *size) ((B, out, h, w) for size None)."""
        x = features[-1]
        for layer in self:
            x = layer(x)
        return upsample(x, size)


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs with bias (the no-BatchNorm DPT variant)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """RefineNet-style fusion: (previous path + RCU(skip)) -> RCU -> bilinear resize -> 1x1 conv.

    `size` None doubles the resolution (the finest level)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: Sequence[int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(upsample(x, size))


def _resize_layers(channels: Sequence[int]) -> nn.ModuleList:
    """Per level: 4x and 2x transposed convs, identity, 3x3 stride-2 conv (patch/4 .. patch*2)."""
    c = channels
    return nn.ModuleList(
        [
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
        ]
    )


class DPTHead(nn.Module):
    """DPT head over four feature maps (B, in, h, w) -> (B, out, *size)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features: int = 256,
        level_channels: Sequence[int] = (256, 512, 1024, 1024),
    ) -> None:
        super().__init__()
        if len(level_channels) != 4:
            raise ValueError(f"level_channels needs 4 entries, got {list(level_channels)}")
        self.projects = nn.ModuleList(nn.Conv2d(in_channels, c, 1) for c in level_channels)
        self.resize_layers = _resize_layers(level_channels)
        self.scratch = nn.Module()
        for i, c in enumerate(level_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FusionBlock(features))
        # The deepest fusion has no skip input, so its first unit is never used; it stays in the
        # state dict (reference layout) but frozen, so DDP does not wait for its gradients.
        self.scratch.refinenet4.resConfUnit1.requires_grad_(False)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, out_channels, 1),
        )

    def forward(self, features: list[torch.Tensor], size: tuple[int, int] | None) -> torch.Tensor:
        """features: 4 x (B, in, h, w), shallow to deep -> (B, out, *size) ((B, out, 8h, 8w)
        for size None)."""
        if len(features) != 4:
            raise ValueError(f"the DPT head takes 4 feature maps, got {len(features)}")
        s = self.scratch
        rn = (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn)
        # resolutions 4x, 2x, 1x, 1/2x the patch grid; each (B, features, ., .)
        levels = [rn[i](self.resize_layers[i](self.projects[i](x))) for i, x in enumerate(features)]
        path = s.refinenet4(levels[3], size=levels[2].shape[-2:])
        path = s.refinenet3(path, levels[2], size=levels[1].shape[-2:])
        path = s.refinenet2(path, levels[1], size=levels[0].shape[-2:])
        path = s.refinenet1(path, levels[0])  # 8x the patch grid: patch 16 -> half resolution
        return upsample(s.output_conv(path), size)


def head_block_ids(kind: str, depth: int) -> list[int]:
    """Encoder blocks a head of this kind reads."""
    _check_kind(kind)
    return dpt_block_ids(depth) if kind == "dpt" else linear_block_ids(depth)


def build_head(kind: str, embed_dim: int, out_channels: int) -> nn.Module:
    """A linear or DPT head over 2 * embed_dim input channels (patch tokens + class mean)."""
    _check_kind(kind)
    if kind == "dpt":
        return DPTHead(2 * embed_dim, out_channels)
    return LinearHead(2 * embed_dim, out_channels)


def _check_kind(kind: str) -> None:
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")


def convert_sync_bn(head: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when a process group with more than one rank exists (the
    reference trains heads with SyncBatchNorm on 8 GPUs); `head` unchanged otherwise. Call it
    before wrapping the head in DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return head
