"""Distillation task: one frozen teacher and several students handed to the shared trainer.

Modules: `teacher` (frozen: never optimised or saved, bf16 on GPUs, replicated or sharded by
size; its weights are loaded through `ModuleSpec.load` once placed) and `student_<encoder name>`
per student (trainable: DDP or FSDP by size, each on its own AdamW / schedule / scaler,
checkpointed under `model.<name>` / `optimizer.<name>`). A batch is an image tensor
(B, 3, H, W) or a dict with `image` and optionally `noise` (B, num_groups), which fixes the
students' masking (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillation.loss import feature_alignment_loss
from distillation.model import Student, teacher_tokens
from distillation.vis import pca_grid
from pixio.architecture import model_architecture
from pixio.checkpoint import encoder_state, save_state_dict
from pixio.data.loader import images_and_noise
from pixio.models.encoder import PixioEncoder
from pixio.models.flops import ViTSpec, distill_flops
from pixio.runtime.distributed import is_main
from pixio.runtime.prefetch import normalize_batch
from pixio.runtime.task import ModuleSpec, OptimizerSpec, StepOutput, Task

TEACHER = "teacher"
STUDENT_PREFIX = "student_"
PICTURE_IMAGES = 4  # images per picture (rows)


def student_module(encoder_name: str) -> str:
    """The module (and optimiser, checkpoint section) name of a student: student_<name>."""
    return STUDENT_PREFIX + encoder_name


def export_name(module: str) -> str:
    """The exported file of a student module: encoder-<encoder name>.safetensors."""
    return f"encoder-{module.removeprefix(STUDENT_PREFIX)}.safetensors"


class DistillTask(Task):
    """Feature distillation: every student regresses the teacher's last-block tokens (computed
    once per batch, without gradients) from its own masked view of the image."""

    def __init__(
        self,
        teacher: PixioEncoder,
        students: dict[str, Student],
        load_teacher: Callable[[nn.Module], None] | None,
        loss: Any,
        mask_ratio: float,
        optim: Any,
    ) -> None:
        self.teacher, self.students = teacher, students  # students by module name
        self.load_teacher = load_teacher  # None: the teacher already holds its weights
        self.loss = loss  # the `loss` config node: cls, patch, fuse
        self.mask_ratio = mask_ratio
        self.optim = optim  # the `optim` config node, one AdamW per student
        self.n_cls = teacher.n_cls_tokens

    def modules(self) -> dict[str, ModuleSpec]:
        teacher = ModuleSpec(
            self.teacher, trainable=False, shard_units=self.teacher.blocks, load=self.load_teacher
        )
        students = {n: ModuleSpec(s, shard_units=s.blocks) for n, s in self.students.items()}
        return {TEACHER: teacher, **students}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {name: OptimizerSpec((name,), self.optim) for name in self.students}

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch on `device`, its uint8 images normalised there (pixio.runtime.prefetch)."""
        return normalize_batch(super().to_device(batch, device))

    def step(self, modules: dict[str, nn.Module], batch: Any) -> StepOutput:
        imgs, noise = images_and_noise(batch)
        with torch.no_grad():  # frozen: no activations kept, no gradient reaches it
            target = teacher_tokens(modules[TEACHER], imgs)  # (B, n_cls + L, D_t)
        losses, metrics = {}, {}
        for name in self.students:
            tokens, ids_keep = modules[name](imgs, self.mask_ratio, noise)
            loss, loss_cls, loss_patch = feature_alignment_loss(
                tokens, target, ids_keep, self.n_cls, self.loss.cls, self.loss.patch,
                self.loss.fuse,
            )  # fmt: skip
            losses[name] = loss
            metrics |= {f"loss/{name}": loss, f"loss_cls/{name}": loss_cls}
            metrics[f"loss_patch/{name}"] = loss_patch
        # Students share no parameter: the sum's gradient is each student's own loss gradient.
        return StepOutput(sum(losses.values()), metrics, losses)

    def flops_per_sample(self, batch: Any) -> float:
        """Training FLOPs per image (pixio.models.flops): the teacher's forward once, each
        student's forward and backward at its own mask grid."""
        height, width = images_and_noise(batch)[0].shape[-2:]
        teacher = ViTSpec.of(self.teacher)
        total = distill_flops(teacher, [], height, width).teacher
        for s in self.students.values():
            d = distill_flops(teacher, [ViTSpec.of(s)], height, width, self.mask_ratio, s.mask_grid)
            total += d.students[0]
        return float(total)

    @torch.no_grad()
    def pictures(self, modules: dict[str, nn.Module], batch: Any) -> dict[str, np.ndarray]:
        """Per student, `pca_<module>`: input | teacher | student features on up to
        PICTURE_IMAGES images, titled with the student and, when the batch carries its
        `iteration` (a dict batch), the step. Every rank runs the forwards (a sharded module
        needs all ranks); only rank 0, whose pictures the trainer writes, renders."""
        imgs = images_and_noise(batch)[0][:PICTURE_IMAGES]
        grid = self.teacher.patch_grid(imgs)
        target = teacher_tokens(modules[TEACHER], imgs)[:, self.n_cls :]  # (b, L, D_t)
        students = {n: modules[n](imgs, 0.0)[0][:, self.n_cls :] for n in self.students}
        if not is_main():
            return {}
        step = f", step {int(batch['iteration'][0]) + 1}" if _has_iteration(batch) else ""
        out = {}
        for name, tokens in students.items():  # (b, L, D_t): the whole image, row-major
            encoder = name.removeprefix(STUDENT_PREFIX)
            title = f"{encoder} distilled from the teacher{step}"
            out[f"pca_{name}"] = pca_grid(imgs, target, tokens, grid, encoder, title)
        return out

    def export(self, states: dict[str, dict[str, torch.Tensor]], output_dir: Path) -> list[Path]:
        """encoder-<name>.safetensors per student: the encoder (no `last_proj`) and its
        architecture in the file's metadata."""
        return [
            save_state_dict(
                encoder_state(state),
                Path(output_dir) / export_name(name),
                student_architecture(self.students[name], name),
            )  # fmt: skip
            for name, state in states.items()
        ]


def _has_iteration(batch: Any) -> bool:
    """A dict batch that says which training iteration it is for ((B,) int64 `iteration`)."""
    return isinstance(batch, dict) and "iteration" in batch


def student_architecture(student: Student, module: str) -> dict[str, Any]:
    """What a student's export records: its encoder's sizes under its registry name."""
    return model_architecture(student, module.removeprefix(STUDENT_PREFIX)) | {"kind": "encoder"}
