"""Time per training iteration of the real `Trainer` on the pre-training demo (configs/experiment/
demo.yaml: pixio_vitt16, 6 blocks, 128 px, a 128 x 2 decoder, batch 16, fp32, a log line every
10 iterations) over fixed in-memory batches, so the data pipeline does not enter.

    .venv/bin/python scripts/bench_trainer.py --iters 40
    PYTHONPATH=/path/to/other/tree .venv/bin/python scripts/bench_trainer.py   # another version

An iteration is the time between two consecutive calls of `Trainer.train_iteration`: the step,
the stop agreement, and the log line on logging iterations. Prints one JSON line: the median and
the mean over the iterations after `--warmup`, apart for logging and other iterations. Run two
versions one after the other, several times, on the same machine, and compare the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=40, help="training iterations")
    p.add_argument("--warmup", type=int, default=5, help="first iterations left out")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args(argv)


def demo_config(output_dir: Path, iters: int, device: str):
    """configs/experiment/demo.yaml of the imported tree, one epoch of `iters` iterations."""
    from hydra import compose, initialize_config_dir

    import pretraining
    from pretraining.config import register_configs

    register_configs()
    configs = Path(pretraining.__file__).resolve().parents[1] / "configs"
    overrides = [
        "experiment=demo", f"train.device={device}", "logger=none", "train.epochs=1",
        f"train.iters_per_epoch={iters}", "train.save_every_iters=100000", "train.vis_every=0",
        f"output_dir={output_dir}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        return compose(config_name="pretrain", overrides=overrides)


def main(argv: list[str] | None = None) -> None:
    import torch

    from pixio.runtime.config import to_container
    from pixio.runtime.distributed import DistInfo
    from pixio.runtime.trainer import Trainer
    from pretraining.config import build_model
    from pretraining.task import MAETask

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(Path(tmp) / "run", args.iters, args.device)
        size, batch = cfg.model.img_size, cfg.train.batch_size
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(batch, 3, size, size, generator=g) for _ in range(args.iters)]
        torch.manual_seed(0)
        task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim)
        trainer = Trainer(cfg, task, batches, info, to_container(cfg))
        starts: list[float] = []
        step = trainer.train_iteration

        def timed(it, b):
            starts.append(time.perf_counter())
            return step(it, b)

        trainer.train_iteration = timed
        trainer.fit()
        starts.append(time.perf_counter())  # the end of the last iteration (its save included)
    times = [b - a for a, b in zip(starts, starts[1:], strict=False)][args.warmup : -1]
    logging = [t for i, t in enumerate(times, args.warmup + 1) if i % cfg.train.log_every == 0]
    other = [t for i, t in enumerate(times, args.warmup + 1) if i % cfg.train.log_every]
    ms = lambda xs: round(1e3 * xs, 2)  # noqa: E731
    print(json.dumps({
        "median_ms": ms(statistics.median(times)), "mean_ms": ms(statistics.mean(times)),
        "median_ms_logging": ms(statistics.median(logging)) if logging else None,
        "median_ms_other": ms(statistics.median(other)), "iterations": len(times),
        "threads": args.threads,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
