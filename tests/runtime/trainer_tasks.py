"""Small tasks written for the tests of the shared trainer: a frozen encoder with a trainable head
on a finite dataset (the example of docs/DESIGN.md), and a task with two trainable modules on two
optimisers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from pixio.runtime.config import LoggerConfig, OptimConfig, TrainConfig
from pixio.runtime.parallel import load_full_state
from pixio.runtime.task import ModuleSpec, OptimizerSpec, StepOutput, Task, Validation


class HeadTask(Task):
    """A frozen encoder and a trainable linear head regressing y; validation: mean squared error
    (plus the sum of sample indices, so tests can see that each sample counted once)."""

    validation = Validation("mse", mode="min")

    def __init__(self, encoder, head, optim: OptimConfig, frozen="auto", encoder_file=None):
        self.encoder, self.head, self.optim, self.frozen = encoder, head, optim, frozen
        self.encoder_file = encoder_file  # when set, the frozen weights come from this file

    def modules(self) -> dict[str, ModuleSpec]:
        load = None
        if self.encoder_file is not None:
            file = self.encoder_file
            load = lambda m: load_full_state(m, lambda: torch.load(file, weights_only=True))  # noqa: E731
        encoder = ModuleSpec(self.encoder, trainable=False, parallel=self.frozen, load=load)
        return {"encoder": encoder, "head": ModuleSpec(self.head)}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {"head": OptimizerSpec(("head",), self.optim)}

    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        with torch.no_grad():  # a frozen encoder keeps no activations for backward
            features = modules["encoder"](batch["x"])
        pred = modules["head"](features)
        return StepOutput(F.mse_loss(pred, batch["y"]), {"pred_mean": pred.mean()})

    def validate(self, modules: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        pred = modules["head"](modules["encoder"](batch["x"]))
        return {"se": ((pred - batch["y"]) ** 2).mean(1), "index": batch["index"].float()}

    def summarize(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        n = float(totals["samples"])
        return {"mse": float(totals["se"]) / n, "samples": n, "index_sum": float(totals["index"])}


class TwoModuleTask(Task):
    """Two trainable modules, each on its own optimiser (`optim_a`, `optim_b`), one summed loss
    (and, with `split_losses`, each optimiser's own loss for its fp16 scaler)."""

    def __init__(self, a, b, optim_a: OptimConfig, optim_b: OptimConfig, split_losses=False):
        self.a, self.b, self.optim_a, self.optim_b = a, b, optim_a, optim_b
        self.split_losses = split_losses

    def modules(self) -> dict[str, ModuleSpec]:
        return {"a": ModuleSpec(self.a), "b": ModuleSpec(self.b)}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {"a": OptimizerSpec(("a",), self.optim_a), "b": OptimizerSpec(("b",), self.optim_b)}

    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        loss_a = F.mse_loss(modules["a"](batch["x"]), batch["y"])
        loss_b = F.mse_loss(modules["b"](batch["x"]), -batch["y"])
        losses = {"a": loss_a, "b": loss_b} if self.split_losses else None
        return StepOutput(loss_a + loss_b, {"loss_a": loss_a, "loss_b": loss_b}, losses)


class Regression(Dataset):
    """`n` samples {x (4,), y (1,), index}; training samples get seeded noise on x (an
    augmentation, so exact resume needs per-sample seeding)."""

    def __init__(self, n: int, augment: bool = True) -> None:
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        noise = 0.01 * torch.randn(4) if self.augment else torch.zeros(4)
        return {"x": self.x[i] + noise, "y": self.y[i], "index": torch.tensor(i)}


def encoder_and_head(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 1)


def task_config(output_dir: Path, *, optim: dict | None = None, **train) -> OmegaConf:
    """A config with only what every job shares (train, optim, logger, output_dir)."""
    defaults = dict(batch_size=2, epochs=3, save_every_iters=1000, log_every=1, vis_every=0,
                    precision="fp32", device="cpu", iters_per_epoch=None)  # fmt: skip
    o = dict(lr=0.05, warmup_epochs=0, schedule="poly", weight_decay=0.0, betas=[0.9, 0.999])
    return OmegaConf.create(
        {
            "train": OmegaConf.structured(TrainConfig(**{**defaults, **train})),
            "optim": OmegaConf.structured(OptimConfig(**{**o, **(optim or {})})),
            "logger": OmegaConf.structured(LoggerConfig(name="none")),
            "output_dir": str(output_dir),
        }
    )


class PerRankTask(Task):
    """Each rank trains its own module in its own process subgroup (as one student per group
    would); the metric names differ per rank, and each module is exported by its group."""

    def __init__(self, name: str, module: nn.Module, group, optim: OptimConfig) -> None:
        self.name, self.module, self.group, self.optim = name, module, group, optim

    def modules(self) -> dict[str, ModuleSpec]:
        return {self.name: ModuleSpec(self.module, group=self.group)}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {self.name: OptimizerSpec((self.name,), self.optim)}

    def step(self, modules: dict[str, nn.Module], batch: dict) -> StepOutput:
        loss = F.mse_loss(modules[self.name](batch["x"]), batch["y"])
        return StepOutput(loss, {f"loss/{self.name}": loss})

    def export(self, states: dict[str, dict[str, torch.Tensor]], output_dir: Path) -> list[Path]:
        paths = []
        for name, state in states.items():
            paths.append(Path(output_dir) / f"{name}.pt")
            torch.save(state, paths[-1])
        return paths
