"""The feature alignment loss against values computed by hand, for every loss and fusion, with
and without masking (ids_keep)."""

from __future__ import annotations

import math

import pytest
import torch

from distillation.loss import feature_alignment_loss

# One image, 1 class token, 3 patches, width 2. The student saw patches 2 then 0 (in that token
# order): its first patch token is compared with the teacher's patch 2, its second with patch 0.
TEACHER = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [3.0, 4.0]]])  # cls, p0, p1, p2
MASKED = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [0.0, -2.0]]])  # cls, (saw p2), (saw p0)
IDS_KEEP = torch.tensor([[2, 0]])
# Unmasked: the student's patches in row-major order, compared with p0, p1, p2.
FULL = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [0.0, -2.0], [1.0, 1.0]]])

# By hand. cls: [0, 2] vs [1, 0]: cosine 0 -> 1; l1 (1 + 2) / 2; mse (1 + 4) / 2.
CLS = {"cosine": 1.0, "l1": 1.5, "mse": 2.5}
# Masked patches: [3, 0] vs [3, 4] (cos 9 / 15 = 0.6, |d| 0 + 4, d^2 0 + 16) and [0, -2] vs
# [0, 1] (cos -1, |d| 0 + 3, d^2 0 + 9).
MASKED_PATCH = {"cosine": 1 - (0.6 - 1) / 2, "l1": (4 + 3) / 4, "mse": (16 + 9) / 4}
# Unmasked patches: [3, 0] vs [0, 1] (cos 0), [0, -2] vs [5, 5] (cos -1/sqrt 2), [1, 1] vs
# [3, 4] (cos 7 / (5 sqrt 2)); |d|: 3 + 1, 5 + 7, 2 + 3; d^2: 9 + 1, 25 + 49, 4 + 9.
FULL_PATCH = {
    "cosine": 1 - (0 - 1 / math.sqrt(2) + 7 / (5 * math.sqrt(2))) / 3,
    "l1": (4 + 12 + 5) / 6,
    "mse": (10 + 74 + 13) / 6,
}


def fused(cls: float, patch: float, n_vis: int, fuse: str) -> float:
    """avg: the plain mean of the two terms; sum: weighted by 1 class token and n_vis patches."""
    return (cls + patch) / 2 if fuse == "avg" else (cls + n_vis * patch) / (1 + n_vis)


@pytest.mark.parametrize("fuse", ["avg", "sum"])
@pytest.mark.parametrize("kind", ["cosine", "l1", "mse"])
@pytest.mark.parametrize("masked", [True, False], ids=["ids_keep", "no_mask"])
def test_loss_values_by_hand(kind, fuse, masked):
    student, ids, patch = (MASKED, IDS_KEEP, MASKED_PATCH) if masked else (FULL, None, FULL_PATCH)
    loss, loss_cls, loss_patch = feature_alignment_loss(student, TEACHER, ids, 1, kind, kind, fuse)
    n_vis = student.shape[1] - 1
    assert loss_cls.item() == pytest.approx(CLS[kind], rel=1e-6)
    assert loss_patch.item() == pytest.approx(patch[kind], rel=1e-6)
    assert loss.item() == pytest.approx(fused(CLS[kind], patch[kind], n_vis, fuse), rel=1e-6)


def test_sum_fusion_differs_from_avg_when_token_counts_differ():
    avg = feature_alignment_loss(MASKED, TEACHER, IDS_KEEP, 1, "mse", "mse", "avg")[0]
    total = feature_alignment_loss(MASKED, TEACHER, IDS_KEEP, 1, "mse", "mse", "sum")[0]
    assert avg.item() == pytest.approx((2.5 + 6.25) / 2)
    assert total.item() == pytest.approx((2.5 + 2 * 6.25) / 3)  # the mean over all 3 tokens


@pytest.mark.parametrize("fuse", ["avg", "sum"])
def test_no_class_loss_is_the_patch_term(fuse):
    loss, loss_cls, loss_patch = feature_alignment_loss(
        MASKED, TEACHER, IDS_KEEP, 1, "none", "cosine", fuse
    )
    assert loss.item() == pytest.approx(MASKED_PATCH["cosine"]) and loss_cls.item() == 0.0
    assert torch.equal(loss, loss_patch)


def test_mixed_losses_and_token_order_matter():
    loss, loss_cls, loss_patch = feature_alignment_loss(
        MASKED, TEACHER, IDS_KEEP, 1, "l1", "cosine", "avg"
    )
    assert loss.item() == pytest.approx((CLS["l1"] + MASKED_PATCH["cosine"]) / 2)
    swapped = feature_alignment_loss(MASKED, TEACHER, IDS_KEEP.flip(1), 1, "l1", "cosine", "avg")
    assert swapped[2].item() != pytest.approx(loss_patch.item())  # compared at the wrong patches


def test_computed_in_fp32_from_bf16_inputs_and_per_batch_mean():
    student = torch.cat([MASKED, MASKED.flip(2)]).bfloat16()  # a second, different image
    teacher = torch.cat([TEACHER, TEACHER]).bfloat16()
    loss, loss_cls, loss_patch = feature_alignment_loss(
        student, teacher, IDS_KEEP.repeat(2, 1), 1, "mse", "mse", "avg"
    )
    assert loss.dtype == loss_cls.dtype == loss_patch.dtype == torch.float32
    # image 2: cls [2, 0] vs [1, 0] -> 1 / 2; patches [0, 3] vs [3, 4], [-2, 0] vs [0, 1]
    second_patch = (9 + 1 + 4 + 1) / 4
    assert loss_cls.item() == pytest.approx((2.5 + 0.5) / 2)
    assert loss_patch.item() == pytest.approx((6.25 + second_patch) / 2)


def test_gradient_reaches_the_student_only_through_visible_tokens():
    student = MASKED.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    loss = feature_alignment_loss(student, teacher.detach(), IDS_KEEP, 1, "mse", "mse", "avg")[0]
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_bad_names_and_mismatched_tokens_are_refused():
    with pytest.raises(ValueError, match="unknown cls_loss 'l2'"):
        feature_alignment_loss(MASKED, TEACHER, IDS_KEEP, 1, "l2", "mse", "avg")
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        feature_alignment_loss(MASKED, TEACHER, IDS_KEEP, 1, "mse", "huber", "avg")
    with pytest.raises(ValueError, match="unknown fuse 'max'"):
        feature_alignment_loss(MASKED, TEACHER, IDS_KEEP, 1, "mse", "mse", "max")
    with pytest.raises(ValueError, match="do not match"):
        feature_alignment_loss(MASKED, TEACHER, None, 1, "mse", "mse", "avg")
