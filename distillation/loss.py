"""The feature alignment loss between a student's projected tokens and the teacher's tokens.

Each term is a mean over tokens of a per-token distance, computed in fp32 whatever the autocast
dtype: `cosine` = 1 - mean cosine similarity; `l1` = mean absolute difference and `mse` = mean
squared difference over every element (tokens x channels). The class-token and visible
patch-token terms are fused by `avg` ((cls + patch) / 2) or `sum`, the token-count weighted
mean (n_cls * cls + n_vis * patch) / (n_cls + n_vis), i.e. the distance averaged over every
token the student produced. `cls_loss="none"` leaves the class tokens out (loss = patch term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillation.choices import CLS_LOSSES, FUSIONS, PATCH_LOSSES  # noqa: F401 (re-exported)


def token_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean distance of two (B, N, D) token sets, in fp32: cosine | l1 | mse."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1).mean()
    if kind == "l1":
        return F.l1_loss(s, t)
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown loss {kind!r}; valid: cosine, l1, mse")


def gather_visible(patches: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
    """The teacher's patch tokens (B, L, D) at the student's visible positions (B, n_vis)."""
    if ids_keep is None:
        return patches
    index = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.gather(patches, 1, index)  # (B, n_vis, D), in the student's token order


def fuse_terms(
    loss_cls: torch.Tensor, loss_patch: torch.Tensor, n_cls: int, n_vis: int, fuse: str
) -> torch.Tensor:
    """avg: (cls + patch) / 2; sum: (n_cls * cls + n_vis * patch) / (n_cls + n_vis)."""
    if fuse == "avg":
        return (loss_cls + loss_patch) / 2
    if fuse == "sum":
        return (n_cls * loss_cls + n_vis * loss_patch) / (n_cls + n_vis)
    raise ValueError(f"unknown fuse {fuse!r}; valid: {', '.join(FUSIONS)}")


def feature_alignment_loss(
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    ids_keep: torch.Tensor | None,
    n_cls_tokens: int,
    cls_loss: str = "cosine",
    patch_loss: str = "cosine",
    fuse: str = "avg",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, loss_cls, loss_patch), fp32 scalars. student_tokens: (B, n_cls + n_vis, D), the
    student's projected output; teacher_tokens: (B, n_cls + L, D), the teacher's for the whole
    image; ids_keep: (B, n_vis) patch indices the student saw, in its token order (None: no
    masking, n_vis = L). loss_cls is 0 with cls_loss "none" (the loss is then the patch term)."""
    if cls_loss not in CLS_LOSSES:
        raise ValueError(f"unknown cls_loss {cls_loss!r}; valid: {', '.join(CLS_LOSSES)}")
    n = n_cls_tokens
    teacher_patches = gather_visible(teacher_tokens[:, n:], ids_keep)
    if teacher_patches.shape != student_tokens[:, n:].shape:
        raise ValueError(
            f"student patch tokens {tuple(student_tokens[:, n:].shape)} do not match the "
            f"teacher's at ids_keep {tuple(teacher_patches.shape)}"
        )
    loss_patch = token_distance(student_tokens[:, n:], teacher_patches, patch_loss)
    if cls_loss == "none":
        return loss_patch, torch.zeros_like(loss_patch), loss_patch
    loss_cls = token_distance(student_tokens[:, :n], teacher_tokens[:, :n], cls_loss)
    n_vis = student_tokens.shape[1] - n
    return fuse_terms(loss_cls, loss_patch, n, n_vis, fuse), loss_cls, loss_patch
