"""pixio.models.flops against torch's FlopCounterMode on the meta device (no memory, no compute):
every registry size, the demo configurations, the distillation recipe and the evaluation heads;
plus hand-computed values and the TFLOP/s / MFU arithmetic."""

from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from tests_helpers import CONFIG_DIR
from torch.utils.flop_counter import FlopCounterMode

import pixio
from pixio.models import flops as F

TOLERANCE = 0.02  # the brief: within 2% of torch's count (the formulas are in fact exact)


def counted(fn, *args) -> tuple[int, dict[str, int]]:
    """Total FLOPs of fn(*args) and the per-module totals, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def close(ours: int, torch_count: int) -> bool:
    return abs(ours - torch_count) <= TOLERANCE * torch_count


def images(height: int, width: int) -> torch.Tensor:
    return torch.empty(1, 3, height, width, device="meta")


def compose_job(config_name: str, overrides: list[str]):
    """The real Hydra config `config_name` of a job (its schema registered) with overrides."""
    from distillation.config import register_configs as distill_schema
    from evaluation.common import register_configs as eval_schema
    from evaluation.knn import register_configs as knn_schema
    from pretraining.config import register_configs as pretrain_schema

    for register in (pretrain_schema, distill_schema, eval_schema, knn_schema):
        register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=config_name, overrides=overrides)


# ---- hand-computed --------------------------------------------------------------------------
def test_formulas_by_hand():
    # N = 10 tokens, D = 4: qkv 2*10*4*12 = 960, proj 320, scores + weighted sum 2 * 2*100*4 =
    # 1600, MLP 2 * 2*10*4*16 = 2560 -> 5440 = 24 N D^2 + 4 N^2 D.
    assert F.block_flops(10, 4) == 5440 == 24 * 10 * 16 + 4 * 100 * 4
    assert F.linear_flops(3, 5, 7) == 210
    assert F.conv_flops(2, 3, 4, 5, 3) == 2 * 6 * 20 * 9
    spec = F.ViTSpec(width=8, depth=2, patch=16, n_cls=8)
    # 32x48 px -> 2x3 patches: embed 2*6*(3*256)*8 = 73728; 2 blocks over 14 tokens
    assert F.encoder_forward_flops(spec, 32, 48) == 73728 + 2 * (24 * 14 * 64 + 4 * 196 * 8)
    # 8x8 patches in 2x2 groups of 4x4 at ratio 0.75: 1 group kept = 16 visible patches
    assert F.visible_patches((8, 8), 0.75, 4) == 16
    assert F.visible_patches((8, 8), 0.0, 4) == 64


def test_bad_sizes_name_the_culprit():
    with pytest.raises(ValueError, match="200x256 is not divisible by the patch size 16"):
        F.encoder_forward_flops(F.ViTSpec.named("pixio_vitb16"), 200, 256)
    with pytest.raises(ValueError, match="head kind"):
        F.head_train_flops("mlp", 64, 1, (4, 4))


# ---- every registry size ------------------------------------------------------------------
@pytest.mark.parametrize("name", pixio.list_models())
def test_every_size_mae_encoder(name):
    """The MAE's encoder pass at 256 px, mask 0.75 (patch embedding of every patch, blocks on
    the 8 class tokens + 64 visible patches), at each registry size's full width and depth."""
    with torch.device("meta"):
        mae = pixio.build_mae(name)
    with torch.no_grad():
        total, _ = counted(mae.forward_encoder, images(256, 256), 0.75, None)
    ours = F.mae_model_flops(mae, mask_ratio=0.75)
    assert close(ours.encoder, total), (ours.encoder, total)
    assert ours.encoder == F.mae_flops(F.ViTSpec.named(name), F.ViTSpec(512, 32), 256, 256).encoder


def test_mae_forward_by_part():
    """ViT-H's whole MAE forward (the default 32-block decoder): encoder and decoder parts."""
    with torch.device("meta"):
        mae = pixio.build_mae("pixio_vith16")
    with torch.no_grad():
        total, per_module = counted(mae, images(256, 256))
    parts = [k for k in per_module if re.fullmatch(r"PixioMAE\.(blocks\.\d+|patch_embed)", k)]
    encoder = sum(per_module[k] for k in parts)
    ours = F.mae_model_flops(mae)
    assert close(ours.forward, total) and close(ours.encoder, encoder)
    assert close(ours.decoder, total - encoder), (ours.decoder, total - encoder)


@pytest.mark.parametrize("name, height, width", [("pixio_vitt16", 160, 224), ("pixio_vitl16", 320, 192)])  # fmt: skip
def test_encoder_any_size(name, height, width):
    """The encoder's feature path on non-square inputs (position table resized)."""
    with torch.device("meta"):
        encoder = pixio.build_encoder(name)
    with torch.no_grad():
        total, _ = counted(encoder.features, images(height, width), [-1])
    assert close(F.encoder_forward_flops(F.ViTSpec.of(encoder), height, width), total)


def test_mae_training_step_counts_backward():
    """Forward + backward of a small MAE (non-default masking) = 3x forward - patch embedding."""
    with torch.device("meta"):
        mae = pixio.build_mae("pixio_vitt16", depth=2, decoder_depth=2, mask_grid=2)

    def step() -> None:
        mae(images(128, 192), mask_ratio=0.5).loss.backward()

    total, _ = counted(step)
    ours = F.mae_model_flops(mae, 128, 192, mask_ratio=0.5)
    assert close(ours.train, total), (ours.train, total)
    assert ours.train != 3 * ours.forward  # the patch embedding's input gradient is not computed


# ---- the demo configurations -------------------------------------------------------------------
def test_pretraining_demo_config():
    from pretraining.train import build_model

    cfg = compose_job("pretrain", ["experiment=demo"])
    with torch.device("meta"):
        mae = build_model(cfg)
    size = cfg.model.img_size

    def step() -> None:
        mae(images(size, size), mask_ratio=cfg.model.mask_ratio).loss.backward()

    total, _ = counted(step)
    assert close(F.mae_model_flops(mae, mask_ratio=cfg.model.mask_ratio).train, total)


def _distill_step_flops(cfg) -> tuple[F.DistillFlops, int]:
    """(ours, torch's) for one DistillTask step of config `cfg` (teacher no_grad, students
    forward + backward), built with the job's own builders."""
    from distillation.task import TEACHER, DistillTask
    from distillation.train import build_students, build_teacher

    with torch.device("meta"):
        teacher = build_teacher(cfg)
        students = build_students(cfg, teacher.embed_dim)
    task = DistillTask(teacher, students, None, cfg.loss, cfg.mask_ratio, cfg.optim)
    batch = images(cfg.img_size, cfg.img_size)
    total, _ = counted(lambda: task.step({TEACHER: teacher, **students}, batch).loss.backward())
    specs = [F.ViTSpec.of(s) for s in students.values()]
    size = cfg.img_size
    ours = F.distill_flops(F.ViTSpec.of(teacher), specs, size, size, cfg.mask_ratio, cfg.mask_grid)
    return ours, total


def test_distillation_demo_config():
    ours, total = _distill_step_flops(compose_job("distill", ["experiment=distill_demo"]))
    assert close(ours.train, total), (ours.train, total)


def test_distillation_5b_to_1b_and_h_students():
    """The paper's recipe: each student's forward at full size (masked, last_proj to the 5B
    teacher's width; the teacher is a plain encoder forward, the training rule is checked on
    the demo above: a 1B backward on meta costs seconds)."""
    from distillation.train import build_students, build_teacher

    cfg = compose_job("distill", ["experiment=distill_vit5b16_to_vit1b16_vith16_imagenet"])
    with torch.device("meta"):
        teacher = build_teacher(cfg)
        students = build_students(cfg, teacher.embed_dim)
    x, size = images(cfg.img_size, cfg.img_size), cfg.img_size
    assert teacher.embed_dim == 3072 and len(students) == 2
    with torch.no_grad():
        for student in students.values():
            total, _ = counted(student, x, cfg.mask_ratio)
            ours, _ = F.student_forward_flops(F.ViTSpec.of(student), teacher.embed_dim, size, size, cfg.mask_ratio, cfg.mask_grid)  # fmt: skip
            assert close(ours, total), (ours, total)


def _head_step_flops(app: str, overrides: list[str]) -> tuple[F.EvalFlops, int]:
    """(ours, torch's) for one head training step of an evaluation config: the frozen encoder
    and the head as the app builds them, through HeadTask.logits, then backward."""
    from evaluation.common import protocol_sizes
    from evaluation.datasets.info import get_info
    from evaluation.features import FrozenFeatures, build_meta_encoder
    from evaluation.heads import build_head, head_block_ids
    from evaluation.task import HeadTask

    cfg = compose_job(f"eval_{app}", overrides)
    encoder = build_meta_encoder(cfg.encoder)
    blocks = head_block_ids(cfg.head.name, encoder.depth)
    out = 1 if app == "depth" else get_info(cfg.dataset.name).num_classes
    with torch.device("meta"):
        head = build_head(cfg.head.name, encoder.embed_dim, out)
    crop = protocol_sizes(encoder.patch_size, cfg.data.crop_size, None, None)["crop_size"]
    features = FrozenFeatures(encoder, blocks)
    x = images(crop, crop)
    total, _ = counted(lambda: HeadTask.logits(features, head, x).float().sum().backward())
    spec = F.ViTSpec.of(encoder)
    return F.eval_flops(spec, cfg.head.name, out, crop, crop, max(blocks) + 1), total


@pytest.mark.parametrize(
    "app, overrides",
    [
        ("depth", ["experiment=depth_demo"]),  # linear on the last of 6 blocks, 128 px crops
        ("depth", ["experiment=depth_demo", "head=dpt"]),  # its DPT option: blocks 0-3 of 6
        ("semseg", ["experiment=semseg_demo"]),  # linear, 150 classes, 128 px crops
        # ViT-H's width (the heads' channels follow it); 4 blocks keep the meta pass short
        ("depth", ["head=linear", "encoder.name=pixio_vith16", "encoder.depth=4"]),
        ("semseg", ["head=dpt", "encoder.name=pixio_vith16", "encoder.depth=4", "dataset=pascal"]),
    ],
)
def test_evaluation_heads(app, overrides):
    ours, total = _head_step_flops(app, overrides)
    assert close(ours.train, total), (ours.train, total)


def test_knn_demo_config():
    from evaluation.features import build_meta_encoder
    from evaluation.knn import global_features

    cfg = compose_job("eval_knn", ["experiment=knn_demo"])
    encoder, crop = build_meta_encoder(cfg.encoder), cfg.data.crop
    with torch.no_grad():
        total, _ = counted(global_features, encoder, images(crop, crop))
    assert close(F.encoder_forward_flops(F.ViTSpec.of(encoder), crop, crop), total)


# ---- throughput and MFU ------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA GeForce RTX 4090", None),
        (None, None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert F.peak_bf16_tflops(name) == peak


def test_utilization_arithmetic():
    # 8 devices, 2e15 FLOPs per step in 2 s: 1e15 / 8 / 1e12 = 125 TFLOP/s per device
    u = F.utilization(2e15, 2.0, num_devices=8, device_name="NVIDIA H100 80GB HBM3")
    assert u.tflops == pytest.approx(125.0)
    assert u.peak_tflops == 989.4 and u.mfu == pytest.approx(125.0 / 989.4)
    override = F.utilization(2e15, 2.0, 8, "NVIDIA H100 80GB HBM3", peak_tflops=500.0)
    assert override.mfu == pytest.approx(0.25)
    unknown = F.utilization(1e12, 1.0, device_name="cpu")
    assert unknown.tflops == pytest.approx(1.0) and unknown.mfu is None
    with pytest.raises(ValueError, match="step_time_s"):
        F.utilization(1e12, 0.0)


def test_tables_of_the_docs():
    """`python -m pixio.models.flops` prints docs/performance.md's tables (values above)."""
    text = F.tables()
    assert "| pixio_vith16 | 344.1 | 91.9 | 58.0 | 449.4 | 29.1 |" in text
    assert "| 5B -> vit1b16 + vith16 | 2,912.4 | 1,138.0 + 534.4 | 4,584.8 |" in text
