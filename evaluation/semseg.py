"""Frozen-encoder semantic segmentation (ADE20K, Pascal VOC, LoveDA) with a DPT or linear head.

    python -m evaluation.semseg experiment=semseg_demo
    python -m evaluation.semseg dataset=loveda head=linear encoder.name=pixio_vith16 \
        encoder.checkpoint=/ckpt/pixio_vith16.pth data.root=/data/loveda
    python -m evaluation.semseg -m dataset=ade20k,pascal,loveda head=dpt,linear launcher=slurm ...

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
    """Train and validate one segmentation head on the frozen encoder."""
    from evaluation.head_job import run_eval  # torch, the models and the trainer: with the job

    run_eval(cfg, "semseg")


# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="eval_semseg", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, then run `main` through the configured launcher."""
    cli_main(cfg, "semseg", main)


if __name__ == "__main__":
    cli()
