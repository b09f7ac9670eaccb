"""Model FLOPs per image of Pixio's models from analytic formulas, and achieved TFLOP/s and MFU.

Convention, that of `torch.utils.flop_counter.FlopCounterMode` (the tests compare against it):
a multiply-add is 2 FLOPs and only matrix products and convolutions count; norms, softmax,
GELU, bias adds, gathers and interpolation are left out (well under 1% of a ViT's FLOPs).

Training = forward + backward. The backward of a matmul or convolution computes the gradient of
its input and of its weight, 2x its forward, except where the input needs no gradient: the
patch embedding (it reads the images) and the DPT head's projections (they read frozen
features) compute only the weight's, 1x. So a trained part costs 3x its forward minus those
first layers' forward; a frozen part (distillation teacher, evaluation encoder) costs its
forward once. These are *model* FLOPs: activation checkpointing's recomputation is not counted,
so MFU does not rise when a run recomputes.

Token counts: an encoder over an (h, w) patch grid runs N = n_cls + h*w tokens; the MAE's
encoder runs n_cls + n_vis with n_vis = kept groups * g*g (`pixio.models.masking`), its decoder
n_cls + h*w. A block of width D over N tokens (MLP ratio r, 4 for Pixio) costs
    qkv 2N*D*3D + scores 2N*N*D + weighted sum 2N*N*D + proj 2N*D*D + MLP 2 * 2N*D*rD
    = (8 + 4r) N D^2 + 4 N^2 D     (= 24 N D^2 + 4 N^2 D at r = 4; independent of the heads).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pixio.models.masking import num_groups, num_kept
from pixio.models.registry import encoder_kwargs

# ---- building blocks -------------------------------------------------------------------------


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """A linear layer over `tokens` rows: 2 * N * d_in * d_out (bias not counted)."""
    return 2 * tokens * d_in * d_out


def conv_flops(out_h: int, out_w: int, c_in: int, c_out: int, kernel: int) -> int:
    """A k x k convolution producing an (out_h, out_w) map: 2 * out_h * out_w * c_in * c_out * k^2.

    A transposed convolution costs the same with its *input* size in place of (out_h, out_w)."""
    return 2 * out_h * out_w * c_in * c_out * kernel * kernel


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm ViT block: (8 + 4r) N D^2 + 4 N^2 D (module docstring)."""
    hidden = int(width * mlp_ratio)
    projections = linear_flops(tokens, width, 3 * width) + linear_flops(tokens, width, width)
    attention = 2 * (2 * tokens * tokens * width)  # q @ k^T and attn @ v, summed over heads
    mlp = linear_flops(tokens, width, hidden) + linear_flops(tokens, hidden, width)
    return projections + attention + mlp


@dataclass(frozen=True)
class ViTSpec:
    """What a Pixio ViT's FLOPs depend on (the head count does not enter)."""

    width: int  # token width D
    depth: int  # blocks
    patch: int = 16  # patch side in pixels
    n_cls: int = 8  # class tokens
    in_chans: int = 3  # image channels
    mlp_ratio: float = 4.0  # MLP hidden width / D

    @classmethod
    def of(cls, encoder: Any) -> ViTSpec:
        """The spec of a built PixioEncoder (or PixioMAE's encoder, a distillation Student); works
        on the meta device."""
        fc1 = encoder.blocks[0].mlp.fc1
        return cls(
            width=encoder.embed_dim,
            depth=len(encoder.blocks),
            patch=encoder.patch_size,
            n_cls=encoder.n_cls_tokens,
            in_chans=encoder.patch_embed.proj.in_channels,
            mlp_ratio=fc1.out_features / fc1.in_features,
        )

    @classmethod
    def named(cls, name: str, **overrides: Any) -> ViTSpec:
        """The spec of registry encoder `name` with size overrides (embed_dim, depth, ...)."""
        k = encoder_kwargs(name, **overrides)
        return cls(k["embed_dim"], k["depth"], k["patch_size"], k["n_cls_tokens"])


def decoder_spec(mae: Any) -> ViTSpec:
    """The decoder of a built PixioMAE as a spec (its width, depth, the encoder's patch)."""
    return ViTSpec(
        width=mae.decoder_embed.out_features,
        depth=len(mae.decoder_blocks),
        patch=mae.patch_size,
        n_cls=mae.n_cls_tokens,
        in_chans=mae.patch_embed.proj.in_channels,
    )


def patch_grid(spec: ViTSpec, height: int, width: int) -> tuple[int, int]:
    """(h, w) patches of an image; ValueError unless the sides divide by the patch."""
    if height % spec.patch or width % spec.patch:
        raise ValueError(f"image {height}x{width} is not divisible by the patch size {spec.patch}")
    return height // spec.patch, width // spec.patch


def patch_embed_flops(spec: ViTSpec, grid: tuple[int, int]) -> int:
    """The patch embedding (a p x p stride-p conv): 2 * h*w * (C p^2) * D."""
    return conv_flops(grid[0], grid[1], spec.in_chans, spec.width, spec.patch)


def tower_flops(spec: ViTSpec, tokens: int, blocks: int | None = None) -> int:
    """`blocks` (default: all) blocks of `spec` over `tokens` tokens: blocks * block_flops."""
    n = spec.depth if blocks is None else blocks
    return n * block_flops(tokens, spec.width, spec.mlp_ratio)


def visible_patches(grid: tuple[int, int], mask_ratio: float, mask_grid: int) -> int:
    """Patches an encoder sees after group masking: kept groups * g^2 (h*w when unmasked)."""
    if mask_ratio == 0:
        return grid[0] * grid[1]
    return num_kept(num_groups(grid[0], grid[1], mask_grid), mask_ratio) * mask_grid**2


# ---- encoders, MAE, distillation ---------------------------------------------------------------


def encoder_forward_flops(spec: ViTSpec, height: int, width: int, blocks: int | None = None) -> int:
    """A frozen encoder's forward on an H x W image (features of the first `blocks` blocks):
    patch embedding + blocks over N = n_cls + h*w tokens."""
    grid = patch_grid(spec, height, width)
    return patch_embed_flops(spec, grid) + tower_flops(spec, spec.n_cls + grid[0] * grid[1], blocks)


@dataclass(frozen=True)
class MAEFlops:
    """Model FLOPs per image of one MAE training step, by part."""

    patch_embed: int  # forward of the patch embedding (every patch, before masking)
    encoder_blocks: int  # forward of the encoder blocks on n_cls + n_vis tokens
    decoder: int  # forward of decoder_embed, the decoder blocks and decoder_pred

    @property
    def encoder(self) -> int:
        """Encoder forward: patch embedding + blocks."""
        return self.patch_embed + self.encoder_blocks

    @property
    def forward(self) -> int:
        return self.encoder + self.decoder

    @property
    def train(self) -> int:
        """Forward + backward: 3x forward minus the patch embedding's input gradient."""
        return 3 * self.forward - self.patch_embed


def mae_flops(
    encoder: ViTSpec,
    decoder: ViTSpec,
    height: int,
    width: int,
    mask_ratio: float = 0.75,
    mask_grid: int = 4,
) -> MAEFlops:
    """Per image: encoder on N_e = n_cls + n_vis tokens; decoder_embed 2 N_e D Dd; decoder
    blocks on N_d = n_cls + h*w; decoder_pred 2 N_d Dd (C p^2) (the class tokens are predicted,
    then dropped)."""
    grid = patch_grid(encoder, height, width)
    n_enc = encoder.n_cls + visible_patches(grid, mask_ratio, mask_grid)
    n_dec = encoder.n_cls + grid[0] * grid[1]
    pixels = encoder.in_chans * encoder.patch**2
    dec = (
        linear_flops(n_enc, encoder.width, decoder.width)
        + tower_flops(decoder, n_dec)
        + linear_flops(n_dec, decoder.width, pixels)
    )
    return MAEFlops(patch_embed_flops(encoder, grid), tower_flops(encoder, n_enc), dec)


def mae_model_flops(
    mae: Any, height: int | None = None, width: int | None = None, mask_ratio: float = 0.75
) -> MAEFlops:
    """`mae_flops` of a built PixioMAE (meta device fine) at H x W (default: its img_size)."""
    default_h, default_w = (g * mae.patch_size for g in mae.grid_size)
    h, w = height or default_h, width or default_w
    return mae_flops(ViTSpec.of(mae), decoder_spec(mae), h, w, mask_ratio, mae.mask_grid)


def student_forward_flops(
    student: ViTSpec, teacher_width: int, height: int, width: int, mask_ratio: float, mask_grid: int
) -> tuple[int, int]:
    """(forward, patch embedding) of a distillation student: patch embedding of every patch,
    blocks on N = n_cls + n_vis, then last_proj Linear(D_s, D_t) and Linear(D_t, D_t) on N."""
    grid = patch_grid(student, height, width)
    tokens = student.n_cls + visible_patches(grid, mask_ratio, mask_grid)
    embed = patch_embed_flops(student, grid)
    proj = linear_flops(tokens, student.width, teacher_width)
    proj += linear_flops(tokens, teacher_width, teacher_width)
    return embed + tower_flops(student, tokens) + proj, embed


@dataclass(frozen=True)
class DistillFlops:
    """Model FLOPs per image of one distillation step."""

    teacher: int  # the frozen teacher's forward (all tokens, every block)
    students: tuple[int, ...]  # each student's forward + backward, in the given order

    @property
    def train(self) -> int:
        return self.teacher + sum(self.students)


def distill_flops(
    teacher: ViTSpec,
    students: Sequence[ViTSpec],
    height: int,
    width: int,
    mask_ratio: float = 0.5,
    mask_grid: int = 4,
) -> DistillFlops:
    """Teacher forward on the whole image + per student 3x forward - its patch embedding."""
    trained = []
    for s in students:
        fwd, embed = student_forward_flops(s, teacher.width, height, width, mask_ratio, mask_grid)
        trained.append(3 * fwd - embed)
    return DistillFlops(encoder_forward_flops(teacher, height, width), tuple(trained))


# ---- evaluation heads ------------------------------------------------------------------------

DPT_FEATURES = 256  # evaluation.heads.DPTHead defaults
DPT_LEVELS = (256, 512, 1024, 1024)


def linear_head_flops(in_channels: int, out_channels: int, grid: tuple[int, int]) -> int:
    """BatchNorm + 1x1 conv on the (h, w) map: 2 h w C_in C_out (upsampling not counted)."""
    return conv_flops(grid[0], grid[1], in_channels, out_channels, 1)


def _dpt_level_sizes(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Map sizes of the four levels: 4x, 2x, 1x the patch grid, then a stride-2 conv's."""
    h, w = grid
    return [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), ((h + 1) // 2, (w + 1) // 2)]


def dpt_head_flops(
    in_channels: int,
    out_channels: int,
    grid: tuple[int, int],
    features: int = DPT_FEATURES,
    levels: Sequence[int] = DPT_LEVELS,
) -> tuple[int, int]:
    """(forward, projections) of the DPT head on four (h, w) maps. Per level i (size S_i, C_i):
    1x1 projection 2hw C_in C_i; resize (4x4 s4 and 2x2 s2 transposed convs 2hw k^2 C_i^2, a
    3x3 s2 conv 2 S_3 9 C_3^2); 3x3 conv to F channels 2 S_i 9 C_i F. Fusion: two residual
    units (two 3x3 convs each) per level, one at the deepest, and a 1x1 out conv at the next
    level's size (8h x 8w after the finest); output 3x3 F->F and 1x1 F->C_out at 8h x 8w."""
    h, w = grid
    size = _dpt_level_sizes(grid)
    proj = sum(conv_flops(h, w, in_channels, c, 1) for c in levels)
    resize = conv_flops(h, w, levels[0], levels[0], 4) + conv_flops(h, w, levels[1], levels[1], 2)
    resize += conv_flops(*size[3], levels[3], levels[3], 3)
    rn = sum(conv_flops(*s, c, features, 3) for s, c in zip(size, levels, strict=True))
    rcu = conv_flops(*size[3], features, features, 3) * 2  # deepest level: no skip unit
    rcu += sum(conv_flops(*s, features, features, 3) * 4 for s in size[:3])
    out_sizes = [size[2], size[1], size[0], (8 * h, 8 * w)]
    fuse_out = sum(conv_flops(*s, features, features, 1) for s in out_sizes)
    final = conv_flops(8 * h, 8 * w, features, features, 3)
    final += conv_flops(8 * h, 8 * w, features, out_channels, 1)
    return proj + resize + rn + rcu + fuse_out + final, proj


def head_train_flops(
    kind: str, embed_dim: int, out_channels: int, grid: tuple[int, int]
) -> tuple[int, int]:
    """(forward, forward + backward) of a linear or DPT head over 2 * embed_dim channels (patch
    tokens + class mean); the DPT projections read frozen features: their backward is 1x."""
    if kind == "linear":
        fwd = linear_head_flops(2 * embed_dim, out_channels, grid)
        return fwd, 3 * fwd
    if kind == "dpt":
        fwd, proj = dpt_head_flops(2 * embed_dim, out_channels, grid)
        return fwd, 3 * fwd - proj
    raise ValueError(f"head kind must be linear or dpt, got {kind!r}")


@dataclass(frozen=True)
class EvalFlops:
    """Model FLOPs per image of one frozen-encoder head training step."""

    encoder: int  # frozen encoder forward, up to the last block the head reads
    head_forward: int
    head_train: int  # head forward + backward

    @property
    def train(self) -> int:
        return self.encoder + self.head_train


def eval_flops(
    encoder: ViTSpec, kind: str, out_channels: int, height: int, width: int, blocks: int
) -> EvalFlops:
    """Encoder forward over its first `blocks` blocks (1 + the deepest block the head reads:
    evaluation.heads.head_block_ids) and the head's training step, at an H x W crop."""
    grid = patch_grid(encoder, height, width)
    fwd, train = head_train_flops(kind, encoder.width, out_channels, grid)
    return EvalFlops(encoder_forward_flops(encoder, height, width, blocks), fwd, train)


# ---- achieved throughput and MFU ---------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor's datasheets, which
# print the sparse figure (2:4 structured sparsity) with an asterisk: the dense one is half.
#   H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (BF16 1,979* / 1,513* / 1,671*),
#     https://www.nvidia.com/en-us/data-center/h100/ ; SXM dense 989.4 per the NVIDIA H100
#     Tensor Core GPU Architecture whitepaper (Hopper, table 1).
#   H200 SXM / NVL: NVIDIA H200 datasheet (BF16 1,979* / 1,671*),
#     https://www.nvidia.com/en-us/data-center/h200/
#   A100 (SXM and PCIe, 40/80 GB): NVIDIA A100 datasheet (BF16 312 | 624*),
#     https://www.nvidia.com/en-us/data-center/a100/
#   L40S: NVIDIA L40S datasheet (BF16 362.05 | 733*), https://www.nvidia.com/en-us/data-center/l40s/
#   L40: NVIDIA L40 datasheet (BF16 181.05 | 362.1*), https://www.nvidia.com/en-us/data-center/l40/
#   L4: NVIDIA L4 datasheet (BF16 242*), https://www.nvidia.com/en-us/data-center/l4/
#   A10: NVIDIA A10 datasheet (BF16 125 | 250*),
#     https://www.nvidia.com/en-us/data-center/products/a10-gpu/
# (pattern on torch.cuda.get_device_name(), peak); the first match wins, so specific names
# come before the names they contain.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bNVL\b", 835.5),
    (r"\bH100\b.*\bPCIe\b", 756.5),
    (r"\bH100\b", 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bH200\b.*\bNVL\b", 835.5),
    (r"\bH200\b", 989.4),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.05),
    (r"\bL40\b", 181.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a CUDA device by name (torch.cuda.get_device_name), None if unknown."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if device_name and re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


@dataclass(frozen=True)
class Utilization:
    """Achieved model throughput of one device."""

    tflops: float  # model TFLOP/s per device
    peak_tflops: float | None  # the peak MFU divides by (None: unknown device, no override)
    mfu: float | None  # tflops / peak_tflops, a fraction


def utilization(
    flops_per_step: float,
    step_time_s: float,
    num_devices: int = 1,
    device_name: str | None = None,
    peak_tflops: float | None = None,
) -> Utilization:
    """Per-device TFLOP/s = flops_per_step / (num_devices * step_time_s) / 1e12, where
    flops_per_step is the model FLOPs of one step summed over all devices (FLOPs per image x
    global batch); MFU = that / peak. The peak is `peak_tflops` when given (an override such
    as a config key), else the dense bf16 figure of `device_name`, else unknown (MFU None)."""
    if step_time_s <= 0 or num_devices < 1:
        raise ValueError(f"need step_time_s > 0 and num_devices >= 1, got {step_time_s}, {num_devices}")  # fmt: skip
    tflops = flops_per_step / (num_devices * step_time_s) / 1e12
    peak = peak_tflops if peak_tflops is not None else peak_bf16_tflops(device_name)
    return Utilization(tflops, peak, tflops / peak if peak else None)


# ---- the tables of docs/performance.md: python -m pixio.models.flops -------------------------


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def tables(peak_tflops: float = 989.4, batch: int = 64) -> str:
    """Markdown: per registry size at 256 px, the encoder forward, the MAE step (mask 0.75, 4x4
    groups, 512 x 32 decoder) and its ideal ms per `batch` images at `peak_tflops`; then the
    distillation recipes (mask 0.5) and the evaluation heads on ViT-H. GFLOP per image."""
    from pixio.models.registry import list_models

    rows = ["| model | encoder fwd | MAE encoder fwd | MAE decoder fwd | MAE train step | "
            f"ms / {batch} images at 100% of {peak_tflops:g} TFLOP/s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in list_models():
        spec = ViTSpec.named(name)
        mae = mae_flops(spec, ViTSpec(512, 32), 256, 256)
        ideal = mae.train * batch / (peak_tflops * 1e12) * 1e3
        rows.append(f"| {name} | {_g(encoder_forward_flops(spec, 256, 256))} | {_g(mae.encoder)} | "
                    f"{_g(mae.decoder)} | {_g(mae.train)} | {ideal:.1f} |")  # fmt: skip
    rows += ["", "| distillation (mask 0.5) | teacher fwd | students fwd+bwd | total |", "|---|---|---|---|"]  # fmt: skip
    teacher = ViTSpec.named("pixio_vit5b16")
    for students in (("pixio_vit1b16", "pixio_vith16"), ("pixio_vitl16", "pixio_vitb16")):
        d = distill_flops(teacher, [ViTSpec.named(s) for s in students], 256, 256)
        parts = " + ".join(_g(s) for s in d.students)
        rows.append(f"| 5B -> {' + '.join(s.removeprefix('pixio_') for s in students)} | {_g(d.teacher)} | {parts} | {_g(d.train)} |")  # fmt: skip
    rows += ["", "| evaluation on pixio_vith16, 256 px | encoder fwd | head fwd+bwd | total |", "|---|---|---|---|"]  # fmt: skip
    vith = ViTSpec.named("pixio_vith16")
    for kind, out, blocks in (("linear", 150, 32), ("dpt", 150, 32), ("dpt", 1, 32)):
        e = eval_flops(vith, kind, out, 256, 256, blocks)
        rows.append(f"| {kind}, {out} output(s) | {_g(e.encoder)} | {_g(e.head_train)} | {_g(e.train)} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    print(tables())
