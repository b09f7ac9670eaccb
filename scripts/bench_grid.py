"""K linear heads in one depth run (`head.lrs`: one encoder pass per batch for every head) against
K separate single-lr runs, on the CPU, through the real app (`evaluation.head_job.run_eval`):
by default pixio_vits16 (random weights, 12 blocks, 384 wide), 128 px crops, batch 8, the depth
demo's KITTI layout (32 training pairs at 128 x 192, 2 validation images), 2 epochs (8
iterations), a validation after each, fp32.

    .venv/bin/python scripts/bench_grid.py --mode grid       # one run, 4 heads
    .venv/bin/python scripts/bench_grid.py --mode singles    # 4 runs, one head each
    /usr/bin/time -v .venv/bin/python scripts/bench_grid.py --mode grid

Time each mode as a whole process, alternately, several times on the same machine, and compare
the medians (docs/evaluation.md, "A grid of heads"). Prints one JSON line: the mode, the heads
and the seconds spent in the runs (after the imports and the data set-up).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

LRS = (1e-3, 2e-3, 5e-3, 1e-2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("grid", "singles"), required=True)
    p.add_argument("--heads", type=int, default=4, choices=range(1, len(LRS) + 1), help="K")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--encoder", default="pixio_vits16", help="a Pixio registry name (12 blocks)")
    p.add_argument("--pairs", type=int, default=32, help="training pairs (batch 8)")
    return p.parse_args(argv)


def config(root: Path, out: Path, lrs: tuple[float, ...], args: argparse.Namespace):
    """configs/eval_depth.yaml with the depth demo's settings, shrunk as the docstring says."""
    from hydra import compose, initialize_config_dir

    from evaluation.common import register_configs

    register_configs()
    grid = {"head.lrs": f"[{','.join(map(str, lrs))}]"} if len(lrs) > 1 else {"optim.lr": lrs[0]}
    values = {
        "experiment": "depth_demo", "dataset": "kitti", "data.root": root, "data.build_demo": True,
        "data.demo_train": args.pairs, "data.demo_val": 2, "encoder.checkpoint": out / "absent",
        "encoder.name": args.encoder, "encoder.depth": 12, "train.batch_size": 8, "train.epochs": 2, "train.val_every": 1,
        "train.log_every": 1000, "train.vis_every": 0, "eval.vis_images": 0, "output_dir": out,
        **grid,
    }  # fmt: skip
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        return compose(config_name="eval_depth", overrides=[f"{k}={v}" for k, v in values.items()])


def main(argv: list[str] | None = None) -> None:
    import torch

    from evaluation.demo_data import build_demo
    from evaluation.head_job import run_eval

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # the runs' own log lines are not what is measured
    lrs = LRS[: args.heads]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "kitti"
        build_demo("kitti", root, args.pairs, 2, size=(128, 192))
        runs = [lrs] if args.mode == "grid" else [(lr,) for lr in lrs]
        start = time.perf_counter()
        for i, run in enumerate(runs):
            run_eval(config(root, Path(tmp) / f"run{i}", run, args), "depth")
        seconds = time.perf_counter() - start
    print(json.dumps({"mode": args.mode, "heads": args.heads, "runs": len(runs), "encoder": args.encoder, "seconds": round(seconds, 2)}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
