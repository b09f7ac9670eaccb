"""MAE training-step time, eager against compiled, with model TFLOP/s and MFU (pixio.models.flops).

    .venv/bin/python scripts/bench_mae.py                       # the demo model on the CPU, fp32
    .venv/bin/python scripts/bench_mae.py --device cuda --model vith16 --batch 64 --bf16

One forward + backward per step (no optimiser step; the AdamW step is timed apart in eager
mode), the median over `--steps` timed steps after a warm-up; each mode runs in this process
one after the other through scripts/gpu_check_stages.mae_bench (the GPU check's benchmark).
Prints a markdown table and, with --json, the full record. Compilation time is reported apart
(the first step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_stages as stages  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=16, help="images per step (the demo's: 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32, the demo's)")
    p.add_argument("--modes", default="none,model", help="none (eager), model, blocks")
    p.add_argument("--json", action="store_true", help="also print every record as JSON")
    args = p.parse_args(argv)
    plan = dataclasses.replace(
        stages.PLANS[args.device], mae=MODELS[args.model], batch=args.batch,
        warmup=args.warmup, steps=args.steps, bf16=args.bf16,
    )  # fmt: skip
    records = {}
    for mode in args.modes.split(","):
        m: dict = {}
        stages.mae_bench(stages.Ctx(args.device, Path(tempfile.gettempdir()), plan), m, mode)
        records[mode] = m
    print("| compile | first step (s) | ms/step median (min-max) | img/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for mode, m in records.items():
        s, mfu = m["step_ms"], "-" if m["mfu"] is None else f"{m['mfu']:.1%}"
        print(f"| {mode} | {m['first_step_s']} | {s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | {m['images_per_s']} | {m['tflops']:.3g} | {mfu} |")  # fmt: skip
    if args.json:
        print(json.dumps(records, indent=2, default=str))


if __name__ == "__main__":
    main()
