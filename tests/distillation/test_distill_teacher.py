"""The teacher is built from the architecture its file records (`teacher_build`): a file of
non-default sizes distils with no sizes in the config; a config size that disagrees with the
record is refused at validation, naming the size; a file without a record builds from the
config (registry sizes where it names none)."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import compose_distill, fixed_batches, make_trainer, overrides_for
from safetensors.torch import load_file

import pixio
from distillation.config import validate_distill
from distillation.task import TEACHER
from distillation.train import build_teacher
from pixio.runtime.config import ConfigError

SIZES = dict(img_size=64, embed_dim=48, depth=3, num_heads=3)  # pixio_vitt16 is 192 x 12, 256 px


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A pixio_vitt16 teacher of non-default sizes, saved with its architecture (safetensors)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    return pixio.save_encoder(pixio.build_encoder("pixio_vitt16", **SIZES), path)


def config(teacher, tmp_path, *extra: str):
    """The tiny CPU config, the teacher's sizes left out (and an existing data.root)."""
    base = overrides_for(teacher, tmp_path / "run", teacher_sizes=False)
    return compose_distill([*base, f"data.root={tmp_path}", *extra])


def test_a_recorded_teacher_builds_and_loads_with_no_sizes_in_the_config(recorded, tmp_path):
    cfg = config(recorded, tmp_path)
    assert cfg.teacher.img_size is None and cfg.teacher.depth is None
    validate_distill(cfg)
    trainer = make_trainer(cfg, fixed_batches(4, 4))
    teacher = trainer.modules[TEACHER]
    assert (teacher.embed_dim, len(teacher.blocks), teacher.blocks[0].attn.num_heads) == (48, 3, 3)
    assert tuple(teacher.patch_embed.img_size) == (64, 64)
    for key, value in load_file(str(recorded)).items():  # the file's weights, loaded strictly
        assert torch.equal(teacher.state_dict()[key], value), key
    for name, student in trainer.task.students.items():  # projected to the file's width
        assert student.last_proj[-1].out_features == 48, name
    out = trainer.task.step(trainer.modules, fixed_batches(1, 4)[0])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "override, differs",
    [
        ("teacher.depth=4", "depth 4 (file: 3)"),
        ("teacher.img_size=128", "img_size 128 (file: 64)"),
        ("teacher.n_cls_tokens=4", "n_cls_tokens 4 (file: 8)"),  # the students follow it
    ],
)
def test_config_sizes_that_disagree_with_the_record_are_refused(recorded, tmp_path, override, differs):  # fmt: skip
    cfg = config(recorded, tmp_path, override)
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint: .*teacher\.safetensors holds") as err:  # fmt: skip
        validate_distill(cfg)
    assert differs in str(err.value) and "\n" not in str(err.value)


def test_a_teacher_file_without_a_record_builds_from_the_config(tmp_path):
    torch.manual_seed(2)
    path = pixio.save_encoder(pixio.build_encoder("pixio_vitt16", **SIZES), tmp_path / "t.pth")
    sized = [f"teacher.{k}={v}" for k, v in SIZES.items()]
    trainer = make_trainer(config(path, tmp_path, *sized), fixed_batches(4, 4))
    assert trainer.modules[TEACHER].embed_dim == 48
    with torch.device("meta"):  # no sizes, no record: the registry's (192 wide, 12 blocks, 256 px)
        teacher = build_teacher(config(path, tmp_path))
    assert (teacher.embed_dim, len(teacher.blocks)) == (192, 12)
    assert tuple(teacher.patch_embed.img_size) == (256, 256)
