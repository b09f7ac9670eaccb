"""ImageNet linear probe of a frozen encoder, MAE's protocol, on the shared trainer.

    python -m evaluation.linear experiment=linear_imagenet encoder.checkpoint=/ckpt/pixio_vith16.pth
    python -m evaluation.linear experiment=linear_demo       # CPU, about a minute

Recipe (MAE's linear probe; docs/evaluation.md, "Linear probe"): frozen encoder; head =
BatchNorm1d(D, affine=False, eps=1e-6) + Linear(D, classes) (weight trunc-normal std 0.01, bias
0) on the global feature (`linear.feature`: `cls`, the mean of the class tokens of the last
block after the final norm; `avgpool`, the mean of its final-normed patch tokens; `both`, the
two concatenated); LARS (momentum 0.9, trust coefficient 1e-3, weight decay 0), lr = blr x
global batch / 256 with blr 0.1 and a global batch of 16384 (`linear.global_batch` sets
`train.accum_iter`), 90 epochs, 10 of linear warmup, then cosine; RandomResizedCrop(256,
bicubic, area 0.08-1) + flip for training, resize 256 + centre crop 256 for validation (Pixio's
256 px input; MAE's is 224).

`head.lrs` trains one head per base lr on the same features in one run (`evaluation.grid`):
the encoder runs once per batch, every head gets its features and has its own LARS and
schedule. Every `train.val_every` epochs each head's top-1 / top-5 is validated; results.json
(the schema of the other evaluations) reports the head with the best top-1 over epochs, its
best and final validation, and every head's.

The config and its checks are `evaluation.linear_config`'s, which loads no torch (`--help`,
`--cfg job` and a config error return at once); `main` imports the job, `evaluation.linear_job`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from evaluation.linear_config import register_configs, validate_linear
from pixio.runtime.launcher import validate_and_launch


def main(cfg: DictConfig) -> None:
    """The linear probe of one frozen encoder (`evaluation.linear_job.run_linear`)."""
    from evaluation.linear_job import run_linear  # torch, the encoder and the trainer: the job

    run_linear(cfg)


register_configs()
# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="eval_linear", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, then run `main` through the configured launcher."""
    validate_and_launch(main, cfg, validate_linear)


if __name__ == "__main__":
    cli()
