"""Frozen-encoder monocular depth (NYUv2, KITTI) with a DPT or linear head.

    python -m evaluation.depth experiment=depth_demo
    python -m evaluation.depth dataset=kitti head=linear encoder.name=pixio_vith16 \
        encoder.checkpoint=/ckpt/pixio_vith16.pth data.root=/data/kitti
    python -m evaluation.depth -m dataset=nyuv2,kitti head=dpt,linear launcher=slurm ...

`main(cfg)` is the job (evaluation.head_job.run_eval, imported when it runs: `--help`, `--cfg job`
and a config error load no torch); `cli` validates the config and hands
`main` to the launcher. A sweep (-m) submits one job per dataset x head, each in
`output_root/<dataset>_<head>`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from evaluation.common import cli_main, register_configs

register_configs()


def main(cfg: DictConfig) -> None:
    """Train and validate one depth head on the frozen encoder."""
    from evaluation.head_job import run_eval  # torch, the models and the trainer: with the job

    run_eval(cfg, "depth")


# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="eval_depth", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, then run `main` through the configured launcher."""
    cli_main(cfg, "depth", main)


if __name__ == "__main__":
    cli()
