"""Helpers of the depth / segmentation app tests: the real eval configs composed with CPU-sized
overrides, a tiny encoder checkpoint, and small demo datasets in the release layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tests_helpers import CONFIG_DIR

import pixio
from evaluation.demo_data import build_demo
from evaluation.head_job import write_results
from evaluation.selection import tables_path

REPO = Path(__file__).resolve().parents[2]

TINY_ENCODER = dict(embed_dim=32, depth=4, num_heads=2)  # depth 4: the DPT head reads 4 blocks
SMALL = (64, 96)  # demo image size: a few windows of 64 per validation image
N_TRAIN, N_VAL = 8, 3


def save_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A random pixio_vitt16 of TINY_ENCODER sizes, saved as .safetensors."""
    torch.manual_seed(seed)
    return pixio.save_encoder(pixio.build_encoder("pixio_vitt16", **TINY_ENCODER), path)


def small_demo(name: str, root: Path) -> Path:
    """A demo dataset with small images (NYUv2 keeps its 480 x 640 frames)."""
    if not root.exists():
        build_demo(name, root, n_train=N_TRAIN, n_val=N_VAL, size=SMALL)
    return root


def cpu_overrides(checkpoint: Path, root: Path, out: Path, **extra: object) -> list[str]:
    """What every CPU app test shrinks: tiny encoder, 64-pixel crops and windows, fp32."""
    values = {
        "encoder.name": "pixio_vitt16",
        "encoder.checkpoint": str(checkpoint),
        **{f"encoder.{k}": v for k, v in TINY_ENCODER.items()},
        "data.root": str(root),
        "data.num_workers": 0,
        "data.crop_size": 64,
        "eval.window": 64,
        "eval.stride": 42,
        "eval.window_batch": 8,
        "eval.vis_images": 2,
        "optim.lr": 1e-3,
        "train.batch_size": 2,
        "train.epochs": 2,
        "train.save_every_iters": 1000,
        "train.log_every": 1,
        "train.vis_every": 0,
        "train.precision": "fp32",
        "train.device": "cpu",
        "logger": "none",
        "launcher": "local",
        "output_dir": str(out),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def compose_eval(app: str, overrides: list[str]):
    """Compose the real configs/eval_<app>.yaml with overrides."""
    from hydra import compose, initialize_config_dir

    from evaluation.common import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name=f"eval_{app}", overrides=overrides)


def knn_config(tmp_path: Path, *overrides: str):
    """configs/eval_knn.yaml composed with `data.root` and `output_dir` under tmp_path."""
    from hydra import compose, initialize_config_dir

    from evaluation.knn import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("eval_knn", [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}", *overrides])  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def make_folder(root: Path, per_class: dict[str, int]) -> Path:
    """ImageFolder with noisy solid-colour images, varied sizes (the transform must cope)."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)), 3)
                noisy = np.clip(np.asarray(rgb) + rng.normal(0, 40, size), 0, 255)
                Image.fromarray(noisy.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def run_knn_app(*overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m evaluation.knn overrides...` in a subprocess (wandb off)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "evaluation.knn", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def fake_run(
    out: Path, app: str, dataset: str, head: str, values: list[float],
    source: str = "pixio", name: str = "pixio_vith16", extra: dict | None = None,
    sha256: str | None = "ab" * 32, demo: bool = False,
) -> None:  # fmt: skip
    """A finished run's files as the trainer leaves them (4 iterations per epoch), then
    results.json through the app's writer (`extra`: the protocol, as the apps pass it;
    `sha256`: the checkpoint's digest as the run's config records it, None for random weights;
    `demo`: the run's data was a demo set, as run_eval records it in data.demo)."""
    metric = "d1" if app == "depth" else "miou"
    out.mkdir(parents=True)
    rows = [{"step": 4 * (e + 1), "epoch": float(e + 1), f"val/{metric}": v, "val/samples": 3.0}
            for e, v in enumerate(values)]  # fmt: skip
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "val_results.json").write_text(json.dumps({"metric": metric, "mode": "max"}))
    config = {"encoder": {"source": source, "name": name, "checkpoint": "/ckpt/encoder.pth", "sha256": sha256},
              "dataset": {"name": dataset}, "head": {"name": head}, "data": {"demo": demo}}  # fmt: skip
    write_results(out, app, config, iters_per_epoch=4, extra=extra)


def fake_history(out, rows, metric="d1", tables=None) -> None:
    """metrics.jsonl (2 iterations per epoch), val_results.json and tables as a run leaves them."""
    out.mkdir(parents=True)
    lines = [{"step": 2 * (e + 1), "epoch": float(e + 1), **{f"val/{k}": v for k, v in r.items()}, "val/samples": 3.0} for e, r in enumerate(rows)]  # fmt: skip
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "val_results.json").write_text(json.dumps({"metric": metric, "mode": "max"}))
    for it, table in (tables or {}).items():
        tables_path(out, it).parent.mkdir(exist_ok=True)
        tables_path(out, it).write_text(json.dumps({"tables": table}))
