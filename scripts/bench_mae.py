"""MAE training-step time, eager against compiled, with model TFLOP/s and MFU (pixio.models.flops).

    .venv/bin/python scripts/bench_mae.py                       # the demo model on the CPU, fp32
    .venv/bin/python scripts/bench_mae.py --device cuda --model vith16 --batch 64 --bf16

A step is one forward + backward (no optimiser step). Every mode's model is built first (the
same weights), compiled and warmed up; then the timed steps interleave the modes (A B C A B C
...), so a machine whose speed drifts (a shared one) slows every mode alike, and the ratio to
the first mode is taken step by step. Prints a markdown table of medians and, with --json, the
records. The first step (compilation included) is reported apart. The models and steps are
scripts/gpu_check_common.py's (the GPU check's MAE benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_common as common  # noqa: E402

# The pre-training demo's MAE (configs/experiment/demo.yaml) and the paper's ViT-H.
MODELS = {
    "demo": dict(
        name="pixio_vitt16",
        depth=6,
        img_size=128,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),  # fmt: skip
    "vith16": dict(name="pixio_vith16"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=16, help="images per step (the demo's: 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (medians)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32, the demo's)")
    p.add_argument("--modes", default="none,model", help="none (eager), model, blocks")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="also print every record as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = dataclasses.replace(
        common.PLANS[args.device], mae=MODELS[args.model], batch=args.batch,
        warmup=args.warmup, steps=args.steps, bf16=args.bf16,
    )  # fmt: skip
    ctx = common.Ctx(args.device, Path(tempfile.gettempdir()), plan)
    records = {mode: {} for mode in args.modes.split(",")}
    runs = {mode: common.mae_step(ctx, m, mode) for mode, m in records.items()}
    for _ in range(args.warmup):
        for run in runs.values():
            run.step()
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(args.steps):
        for mode, run in runs.items():
            times[mode] += common.time_steps(run.step, 1, args.device)
    first = next(iter(runs))
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} interleaved steps per mode")  # fmt: skip
    print(f"| compile | first step (s) | ms/step median (min-max) | img/s | TFLOP/s | MFU | time / {first} (median of pairs) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for mode, m in records.items():
        common.throughput(ctx, m, times[mode])
        ratio = statistics.median(a / b for a, b in zip(times[mode], times[first], strict=True))
        s, mfu = m["step_ms"], "-" if m["mfu"] is None else f"{m['mfu']:.1%}"
        print(f"| {mode} | {m['first_step_s']} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | {m['images_per_s']} | {m['tflops']:.3g} | {mfu} | {ratio:.2f} |")  # fmt: skip
    if args.json:
        print(json.dumps(records, indent=2, default=str))


if __name__ == "__main__":
    main()
