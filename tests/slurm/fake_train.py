"""A fake Pixio training job for the launcher / pre-emption tests.

``main(cfg)`` follows the trainer's contract: ``init_distributed()``, a loop of "optimizer steps"
(a sleep plus an all-reduce), ``PreemptionHandler`` polled at every step boundary, the step
counter saved atomically before ``requeue_and_exit()``, resume from that counter on restart.

Files under ``cfg.output_dir``: ``rank{r}.json`` (what each rank saw), ``starts.txt`` (one line per
start of rank 0), ``steps.txt`` (one line per executed step, rank 0), ``counter.json`` (the
"checkpoint") and ``done.json`` (written at the end).

Run as ``python -m fake_train key=value ...`` it goes through ``launch()`` like the real entry.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pixio.runtime import distributed
from pixio.runtime.launcher import launch
from pixio.runtime.preemption import PreemptionHandler


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic, like the real checkpoint writer


def _step_seconds(cfg: DictConfig) -> float:
    # Slow first run: the time-limit test needs the job to still be running when SLURM signals.
    first_run = int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0
    return (
        float(cfg.fake.get("first_run_step_s") or cfg.fake.step_s) if first_run else cfg.fake.step_s
    )


def main(cfg: DictConfig) -> int:
    """The fake training run; returns the final step count."""
    info = distributed.init_distributed(device=cfg.fake.get("device", "auto"))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    counter = out / "counter.json"
    start = json.loads(counter.read_text())["step"] if counter.exists() else 0
    mean_rank = distributed.all_reduce_mean(torch.tensor([float(info.rank)])).item()
    _write_json(
        out / f"rank{info.rank}.json",
        {
            "rank": info.rank,
            "world_size": info.world_size,
            "local_rank": info.local_rank,
            "device": str(info.device),
            "mean_rank": mean_rank,
            "group": distributed.is_dist(),
            "host": socket.gethostname(),
            "job_id": os.environ.get("SLURM_JOB_ID"),
        },
    )
    if info.is_main:
        with open(out / "starts.txt", "a") as f:
            f.write(f"{start} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
    step_s = _step_seconds(cfg)
    with PreemptionHandler() as preempt:
        step = start
        while step < cfg.fake.steps:
            time.sleep(step_s)
            ones = distributed.all_reduce_mean(torch.ones(1))  # a collective, like DDP's
            assert ones.item() == 1.0
            if info.is_main:
                with open(out / "steps.txt", "a") as f:
                    f.write(f"{step}\n")
            step += 1
            if preempt.requested():
                if info.is_main:
                    _write_json(counter, {"step": step})
                preempt.requeue_and_exit(step)
    if info.is_main:
        _write_json(out / "done.json", {"steps": step, "start": start})
    distributed.cleanup()
    return step


def _cli(argv: list[str]) -> None:
    """``python -m fake_train output_dir=... launcher.gpus=2 fake.steps=3``."""
    base = {
        "output_dir": "outputs/fake",
        "launcher": {"name": "local", "gpus": 1},
        "fake": {"steps": 3, "step_s": 0.0, "device": "cpu"},
    }
    # `launcher=local` selects a Hydra group in the real entry point; here it sets the name.
    dotlist = [
        f"launcher.name={a.split('=', 1)[1]}" if a.startswith("launcher=") else a for a in argv
    ]
    cfg = OmegaConf.merge(OmegaConf.create(base), OmegaConf.from_dotlist(dotlist))
    launch(main, cfg, argv)


if __name__ == "__main__":
    _cli(sys.argv[1:])
