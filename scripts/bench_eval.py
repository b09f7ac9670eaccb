"""Sliding-window inference speed: windows batched vs one window per call (the reference).

    python scripts/bench_eval.py                       # pixio_vitt16 + DPT head, CPU or GPU
    python scripts/bench_eval.py --encoder pixio_vith16 --device cuda --precision bf16

A frozen encoder (random weights: speed does not depend on them) and a DPT head at default
settings (256 features) predict depth on random normalised images of each size; for every
size the full-image prediction is timed `--runs` times per path after one warm-up, and the
median gives images/s. Also prints the largest difference between the two paths' outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable

import torch

from evaluation.features import FrozenFeatures
from evaluation.heads import build_head, head_block_ids
from evaluation.inference import sliding_window, window_boxes
from pixio.models.registry import build_encoder


def depth_predictor(encoder_name: str, head_kind: str, device: torch.device, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """windows (N, 3, 256, 256) -> sigmoid(head) * 10 (N, 1, 256, 256), frozen encoder + head."""
    torch.manual_seed(0)
    encoder = build_encoder(encoder_name)
    features = FrozenFeatures(encoder, head_block_ids(head_kind, encoder.depth)).to(device)
    head = build_head(head_kind, encoder.embed_dim, 1).to(device).eval()
    bf16 = precision == "bf16"

    @torch.no_grad()
    def predict(windows: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()  # fmt: skip
        with autocast:
            out = head(features(windows), windows.shape[-2:])
        return torch.sigmoid(out.float()) * 10.0

    return predict


def time_once(predict: Callable, image: torch.Tensor, window_batch: int) -> tuple[float, torch.Tensor]:  # fmt: skip
    """Seconds of one full-image prediction (synchronised on CUDA) and the prediction."""
    if image.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = sliding_window(predict, image, window_batch=window_batch, reduce="mean")
    if image.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench_size(predict: Callable, size: tuple[int, int], runs: int, batch: int, device: torch.device) -> dict:  # fmt: skip
    """Median images/s of both paths on one image size, and their largest output difference."""
    image = torch.randn(3, *size, device=device)
    row: dict = {"size": f"{size[0]}x{size[1]}", "windows": len(window_boxes(*size))}
    outputs = {}
    for name, wb in (("one_window", 1), ("batched", batch)):
        time_once(predict, image, wb)  # warm-up (allocator, kernel choice)
        times = []
        for _ in range(runs):
            seconds, outputs[name] = time_once(predict, image, wb)
            times.append(seconds)
        row[f"{name}_img_s"] = 1.0 / statistics.median(times)
    row["speedup"] = row["batched_img_s"] / row["one_window_img_s"]
    row["max_abs_diff"] = float((outputs["batched"] - outputs["one_window"]).abs().max())
    return row


def parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="pixio_vitt16")
    parser.add_argument("--head", default="dpt", choices=("dpt", "linear"))
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(512, 683), (375, 1242)])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window-batch", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    predict = depth_predictor(args.encoder, args.head, device, args.precision)
    print(f"{args.encoder} + {args.head} head, {device} ({torch.get_num_threads()} threads), {args.precision}, median of {args.runs}")  # fmt: skip
    print(f"| image | windows | one window (img/s) | batched x{args.window_batch} (img/s) | speed-up | max diff |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    rows = []
    for size in args.sizes:
        r = bench_size(predict, size, args.runs, args.window_batch, device)
        rows.append(r)
        print(f"| {r['size']} | {r['windows']} | {r['one_window_img_s']:.3f} | {r['batched_img_s']:.3f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args) | {"sizes": [list(s) for s in args.sizes]}, "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
