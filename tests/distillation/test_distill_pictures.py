"""Distillation's PCA picture explains itself: titled panels (input / teacher / student), the
student in the title and the step when the batch carries it; both feature maps in the
teacher's basis, so identical directions get identical colours; drawn at a readable size."""

from __future__ import annotations

import numpy as np
import torch
from distill_helpers import fixed_batches, make_trainer

from distillation import task as task_module
from distillation import vis
from pixio.runtime.vis import PANEL_PX, to_pixels

GRID = (2, 3)  # 32 x 48 px at patch 16


def features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 48, generator=g), torch.randn(2, 6, 8, generator=g)


def test_rows_are_titled_and_the_student_is_shown_in_the_teachers_basis():
    imgs, teacher = features(0)
    student = 3.0 * teacher  # the same directions, other lengths: the same colours
    student[1, 0] = -teacher[1, 0]  # one patch of image 1 points the other way
    rows = vis.pca_rows(imgs, teacher, student, GRID, "pixio_vitt16")
    assert len(rows) == 2
    for i, row in enumerate(rows):
        assert [p.title for p in row] == ["input", "teacher features (PCA)", "pixio_vitt16 features (teacher's basis)"]  # fmt: skip
        assert all(p.image.shape == (32, 48, 3) for p in row)
        assert np.allclose(row[0].image, to_pixels(imgs[i]).permute(1, 2, 0).numpy())
        ours = row[1].image.reshape(-1, 3)
        assert np.allclose(ours.min(0), 0) and np.allclose(ours.max(0), 1)  # fitted on itself
        assert np.array_equal(row[1].image[::16, ::16], row[1].image[15::16, 15::16])  # per patch
    assert np.allclose(rows[0][1].image, rows[0][2].image, atol=1e-6)
    same = np.ones((32, 48), bool)
    same[:16, :16] = False  # patch (0, 0) of image 1
    assert np.allclose(rows[1][1].image[same], rows[1][2].image[same], atol=1e-6)
    assert not np.allclose(rows[1][1].image[:16, :16], rows[1][2].image[:16, :16])


def test_the_picture_is_rendered_at_a_readable_size():
    imgs, teacher = features(1)
    picture = vis.pca_grid(imgs, teacher, teacher, GRID, "pixio_vits16", "step 3")
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert picture.shape[0] >= 2 * PANEL_PX  # two rows of 32-px crops, each ~256 px high
    assert picture.shape[1] >= 3 * PANEL_PX * 48 / 32
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 100  # drawn, not blank


def test_task_pictures_name_the_student_and_the_step(distill_config, monkeypatch):
    seen = []  # (student, title) per picture drawn

    def fake(imgs, teacher, student, grid, name, title):
        seen.append((name, title))
        return vis.pca_grid(imgs, teacher, student, grid, name, title)

    monkeypatch.setattr(task_module, "pca_grid", fake)
    trainer = make_trainer(distill_config(), fixed_batches(4, 4))
    batch = fixed_batches(1, 4)[0]
    out = trainer.task.pictures(trainer.modules, batch)
    assert sorted(out) == ["pca_student_pixio_vits16", "pca_student_pixio_vitt16"]
    assert all(p.dtype == np.uint8 and p.shape[0] >= 4 * PANEL_PX for p in out.values())
    assert sorted(seen) == [
        ("pixio_vits16", "pixio_vits16 distilled from the teacher"),
        ("pixio_vitt16", "pixio_vitt16 distilled from the teacher"),
    ]
    seen.clear()
    trainer.task.pictures(trainer.modules, {**batch, "iteration": torch.full((4,), 31)})
    assert sorted(seen)[0] == ("pixio_vits16", "pixio_vits16 distilled from the teacher, step 32")
