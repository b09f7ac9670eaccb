"""k-NN classification of frozen global features (docs/reproduction.md), function and app.

    python -m evaluation.knn encoder.name=pixio_vith16 encoder.checkpoint=pixio_vith16.pth \
        data.root=/datasets/imagenet launcher.gpus=8
    python -m evaluation.knn experiment=knn_demo     # CPU, about a minute

Protocol: resize the short side to 256 (bicubic), center crop 256, ImageNet normalisation (on
the device: the loader's workers hand over uint8 crops);
feature = mean of the class tokens of the last block BEFORE the final norm, L2-normalised;
cosine similarity to every training image, the k nearest vote with weight exp(sim / T)
(T = 0.07), top-1 / top-5 accuracy in percent for k in {10, 20, 100, 200}. The maths (and the
demo folder) are the library's `pixio.knn`, shared with pre-training's online k-NN monitor.

Unlike the reference, every image is extracted once over all ranks (`EvalLoader`), the classes
come from the folders (not a hard-coded 1000), chunking works for any set size, and the votes
are summed in log space, so a small T cannot overflow exp(sim / T) (float32 overflows for
sim / T > 88.7: at T = 0.01, for sim > 0.887).

The output folder's `results.json` is this run's alone: a folder holding another task's or
another encoder's results is refused; a re-run of the same k-NN (same encoder, same checkpoint
digest) replaces its own. results.json is written first (atomically), the optional features
after it. An unreadable image stops the run with one line naming it (no sample is skipped: the
bank and the accuracy's denominator would change).

The config and its checks are `evaluation.knn_config`'s, which loads no torch (`--help`,
`--cfg job` and a config error return at once); `main` imports the job, `evaluation.knn_job`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from evaluation.knn_config import register_configs, validate_knn
from pixio._lazy import lazy_exports
from pixio.runtime.launcher import validate_and_launch

# The library's k-NN, re-exported; loaded on use (torch).
_EXPORTS = {name: "pixio.knn" for name in ("build_demo_folders", "global_features", "knn_classify", "knn_evaluate")}  # fmt: skip
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def main(cfg: DictConfig) -> None:
    """k-NN evaluation of one frozen encoder: results.json, a table, wandb, then (optional)
    features.pt (`evaluation.knn_job.knn_job`)."""
    from evaluation.knn_job import knn_job  # torch, torchvision and the encoder: with the job

    validate_knn(cfg)
    knn_job(cfg)


register_configs()
# Absolute, so the configs are found however the module is started (python -m, -c, an import).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="eval_knn", version_base=None)
def cli(cfg: DictConfig) -> None:
    """Validate, then run `main` through the configured launcher."""
    validate_and_launch(main, cfg, validate_knn)


if __name__ == "__main__":
    cli()
