"""The student (encoder + last_proj on a masked input), the teacher's features and the strict
teacher loading."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import TEACHER, write_teacher
from safetensors.torch import load_file, save_file

import pixio
from distillation.model import build_student, teacher_loader, teacher_tokens
from pixio.checkpoint import encoder_state
from pixio.models.masking import group_masking
from pixio.runtime.config import ConfigError
from pixio.runtime.parallel import materialize

SIZE = dict(embed_dim=16, depth=2, num_heads=2, img_size=64)


def student(mask_grid: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_student("pixio_vitt16", 48, mask_grid, **SIZE).eval()


def test_masked_forward_keeps_class_tokens_and_the_visible_groups_of_a_non_square_input():
    model = student()
    imgs = torch.randn(2, 3, 64, 128)  # 4 x 8 patches: 2 x 4 groups of 2 x 2
    noise = torch.rand(2, 8)
    tokens, ids_keep = model(imgs, 0.5, noise)
    expected = group_masking(2, (4, 8), 2, 0.5, noise).ids_keep
    assert torch.equal(ids_keep, expected) and ids_keep.shape == (2, 16)  # 4 groups x 4 patches
    assert tokens.shape == (2, 8 + 16, 48)  # 8 class tokens always kept, projected to D_t


def test_unmasked_forward_is_last_proj_of_the_final_normed_tokens():
    model = student()
    imgs = torch.randn(2, 3, 64, 64)
    tokens, ids_keep = model(imgs, 0.0)
    last = model.features(imgs, [-1])[0]
    normed = torch.cat([last["cls_tokens_norm"], last["patch_tokens_norm"]], 1)
    assert ids_keep is None
    torch.testing.assert_close(tokens, model.last_proj(normed))


def test_last_proj_is_linear_layernorm_gelu_linear_and_outside_the_encoder_state():
    model = student()
    kinds = [type(m).__name__ for m in model.last_proj]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert model.last_proj[0].in_features == 16 and model.last_proj[3].out_features == 48
    state = model.state_dict()
    encoder = encoder_state(state)
    assert set(state) - set(encoder) == {k for k in state if k.startswith("last_proj.")}
    fresh = pixio.build_encoder("pixio_vitt16", **SIZE)
    fresh.load_state_dict(encoder, strict=True)  # exactly the encoder's keys


def test_meta_build_materialises_to_the_same_weights_as_a_cpu_build():
    cpu = student(seed=3)
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = build_student("pixio_vitt16", 48, 2, **SIZE)
    materialize(meta, torch.device("cpu"))
    for key, value in cpu.state_dict().items():
        assert torch.equal(meta.state_dict()[key], value), key


def test_teacher_tokens_are_the_last_block_output_before_the_final_norm():
    torch.manual_seed(0)
    teacher = pixio.build_encoder("pixio_vitt16", **TEACHER).eval()
    imgs = torch.randn(2, 3, 64, 64)
    out = teacher_tokens(teacher, imgs)
    x = teacher.prepend_cls(teacher.embed_patches(imgs)[0])
    for block in teacher.blocks:
        x = block(x)
    torch.testing.assert_close(out, x)  # no final norm
    assert not torch.allclose(out, teacher.norm(x))


def _meta_teacher():
    with torch.device("meta"):
        return pixio.build_encoder("pixio_vitt16", **TEACHER)


def test_teacher_loads_strictly(tmp_path):
    path = write_teacher(tmp_path / "t.safetensors", seed=5)
    teacher = materialize(_meta_teacher(), torch.device("cpu"), initialize=False)
    teacher_loader(path)(teacher)
    for key, value in load_file(str(path)).items():
        assert torch.equal(teacher.state_dict()[key], value), key


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", r"missing keys \['blocks.1.mlp.fc2.bias'\] \("),
        ("unexpected", r"unexpected keys \['blocks.2.norm1.weight'\] \("),
        ("shape", r"the model has img_size 64 \(file: 128\) \("),  # the size, not the key
    ],
)
def test_a_teacher_checkpoint_that_does_not_match_is_an_error(tmp_path, change, message):
    state = load_file(str(write_teacher(tmp_path / "t.safetensors")))
    if change == "missing":
        del state["blocks.1.mlp.fc2.bias"]
    elif change == "unexpected":
        state["blocks.2.norm1.weight"] = torch.ones(32)  # a third block the teacher lacks
    else:
        state["pos_embed"] = torch.zeros(1, 8 + 64, 32)  # trained at 128 px
    save_file(state, str(tmp_path / "bad.safetensors"))
    teacher = materialize(_meta_teacher(), torch.device("cpu"), initialize=False)
    with pytest.raises(
        ConfigError, match="^teacher.checkpoint: .*does not (match|fit).*: " + message
    ):
        teacher_loader(tmp_path / "bad.safetensors")(teacher)
