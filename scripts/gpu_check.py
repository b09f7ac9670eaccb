"""Pixio's GPU check: one prepared run that answers "does it work, and how fast" on one GPU.

    scripts/gpu_check.sh                          # every stage on the GPU, 8-minute budget
    scripts/gpu_check.sh --cpu                    # tiny sizes on the CPU (or GPU_CHECK_DEVICE=cpu)
    scripts/gpu_check.sh --stages env,mae_eager --budget 120 --timeout mae_compiled=300

Stages, most valuable first (`--list` prints them): versions; ViT-H/16 MAE forward + backward at
batch 64 in bf16, eager then compiled block by block as train.compile does (ms/step, img/s, TFLOP/s and MFU from pixio.models.flops,
encoder vs decoder time, kernel count, peak memory); the pre-training demo stopped and resumed
against an uninterrupted run; FSDP2 on a one-rank process group with compile, activation
checkpointing, DCP save/load and the RNG round trip; the trainer with those keys; the depth,
segmentation, k-NN and distillation demos; JPEG decoding on the CPU and on the GPU; last, the
MAE benchmark with the whole model compiled as one graph, for comparison.

Each stage runs in its own process under its own time limit, within one global budget: a stage
that fails (or dies, or runs out of its time) is recorded with its error's last line and the
next one runs; once the budget is spent the remaining stages are recorded as skipped. Results go
to `<out>/gpu_check.json` (rewritten after every stage) and everything printed to
`<out>/gpu_check.log`; both paths are printed first and last. Exit status 0 when no stage
failed, 1 otherwise. This driver imports no torch; the stages are in scripts/gpu_check_stages.py,
the plans and the MAE benchmark in scripts/gpu_check_common.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from gpu_check_common import last_line  # no torch at import

ROOT = Path(__file__).resolve().parents[1]
# One H100 for at most 8 minutes: 450 s of stages leaves room for the driver's start and a last
# stage's grace period (TERM_GRACE_S).
GPU_BUDGET_S = 450
CPU_BUDGET_S = 900
MIN_START_S = 15  # a stage is skipped when less than this is left of the budget
TERM_GRACE_S = 10  # a stage past its limit gets SIGTERM, then SIGKILL this much later


@dataclass(frozen=True)
class Stage:
    name: str
    gpu_timeout_s: int  # its own limit on the GPU (further capped by what is left)
    cpu_timeout_s: int  # ... in the CPU mode
    doc: str


STAGES = (
    Stage("env", 60, 60, "versions: torch, CUDA, cuDNN, NCCL, driver, device, peak bf16"),
    Stage("mae_eager", 120, 90, "ViT-H/16 MAE fwd+bwd, batch 64, bf16, eager: ms/step, MFU, split"),
    Stage("mae_compiled", 300, 300, "the same, each block compiled as train.compile does"),
    Stage("pretrain_resume", 180, 240, "pre-training demo stopped at max_iters, resumed, vs whole"),
    Stage("fsdp2", 180, 120, "FSDP2 on a one-rank group: compile, act. ckpt, DCP, RNG round trip"),
    Stage("trainer_keys", 180, 240, "the trainer with parallel=fsdp, compile, act. ckpt: resume"),
    Stage("depth_demo", 120, 150, "python -m evaluation.depth experiment=depth_demo"),
    Stage("semseg_demo", 120, 150, "python -m evaluation.semseg experiment=semseg_demo"),
    Stage("knn_demo", 90, 150, "python -m evaluation.knn experiment=knn_demo"),
    Stage("distill_demo", 120, 150, "python -m distillation.train experiment=distill_demo"),
    Stage("jpeg", 60, 60, "JPEG decode: PIL and torchvision on the CPU, nvjpeg on the GPU"),
    Stage("mae_compiled_model", 180, 240, "the MAE benchmark with the whole model compiled"),
)
BY_NAME = {s.name: s for s in STAGES}


# ---- the driver --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU mode: tiny sizes, short budget")
    p.add_argument("--budget", type=float, help=f"global seconds (GPU {GPU_BUDGET_S}, CPU {CPU_BUDGET_S})")  # fmt: skip
    p.add_argument(
        "--stages", help="comma-separated stages to run, in the fixed order (default all)"
    )
    p.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS", help="a stage's own limit")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default outputs/gpu_check/<time>)")
    p.add_argument("--list", action="store_true", help="print the stages and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = p.parse_args(argv)
    args.cpu = args.cpu or os.environ.get("GPU_CHECK_DEVICE", "").lower() == "cpu"
    return args


def selected(spec: str | None) -> list[Stage]:
    """The stages named in `spec` (all when None), in the fixed order; SystemExit on a bad name."""
    if not spec:
        return list(STAGES)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"error: --stages: unknown {unknown}; valid: {', '.join(BY_NAME)}")
    return [s for s in STAGES if s.name in names]


def timeouts(pairs: list[str], cpu: bool) -> dict[str, float]:
    """Each stage's limit: its default for the mode, or a --timeout STAGE=SECONDS."""
    limits = {s.name: float(s.cpu_timeout_s if cpu else s.gpu_timeout_s) for s in STAGES}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in limits or not value.replace(".", "", 1).isdigit():
            raise SystemExit(f"error: --timeout {pair!r}: expected STAGE=SECONDS, STAGE one of {', '.join(limits)}")  # fmt: skip
        limits[name] = float(value)
    return limits


def run_stage(
    stage: Stage, stage_limit: float, left: float, args: argparse.Namespace, log: TextIO
) -> dict[str, Any]:
    """Run one stage in a child process (its own process group) for at most its limit or what
    is `left` of the budget."""
    limit = min(stage_limit, left)
    result_file = args.out / "results" / f"{stage.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage.name, "--out", str(args.out)]  # fmt: skip
    if args.cpu:
        cmd.append("--cpu")
    log.write(f"\n===== {stage.name}: {stage.doc} (limit {limit:.0f} s) =====\n")
    log.flush()
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    timed_out = not finished(child, limit)
    if timed_out:  # the stage's own process group (its jobs too): TERM, so it records what it
        os.killpg(child.pid, signal.SIGTERM)  # measured, then KILL after a grace period
        if not finished(child, TERM_GRACE_S):
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    seconds = round(time.perf_counter() - start, 1)
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        tail = last_line(read_tail(args.out / "gpu_check.log"))
        result = {"status": "failed", "error": f"stage process exited with {child.returncode} and no result: {tail}"}  # fmt: skip
    if timed_out and limit < stage_limit:  # stopped by the budget, not by its own limit
        result.pop("error", None)
        result.update(status="skipped", reason=f"out of time: stopped after {limit:.0f} s, when the global budget ran out")  # fmt: skip
    elif timed_out:
        result.update(status="failed", error=f"timed out after {limit:.0f} s")
    return {**result, "seconds": seconds}


def finished(child: subprocess.Popen, seconds: float) -> bool:
    """Whether `child` ends within `seconds`."""
    try:
        child.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def read_tail(path: Path, size: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace")


def write_report(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


def summary_line(name: str, r: dict[str, Any]) -> str:
    why = r.get("error") or r.get("reason")
    return f"  {name:20s} {r['status']:8s} {r.get('seconds', 0):7.1f} s" + (
        f" ({why})" if why else ""
    )


def drive(args: argparse.Namespace) -> int:
    """Run the selected stages within the budget; write the JSON and log; 1 if any failed."""
    budget = (
        args.budget if args.budget is not None else (CPU_BUDGET_S if args.cpu else GPU_BUDGET_S)
    )
    stages, limits = selected(args.stages), timeouts(args.timeout, args.cpu)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = (args.out or ROOT / "outputs" / "gpu_check" / (stamp + ("-cpu" if args.cpu else ""))).resolve()  # fmt: skip
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    json_path, log_path = args.out / "gpu_check.json", args.out / "gpu_check.log"
    print(f"gpu_check: results -> {json_path}\ngpu_check: log     -> {log_path}", flush=True)
    report: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu", "argv": sys.argv[1:], "budget_s": budget, "started": stamp, "stages": {}}  # fmt: skip
    deadline = time.perf_counter() + budget
    with open(log_path, "a") as log:
        for stage in stages:
            left = deadline - time.perf_counter()
            if left < MIN_START_S:
                result = {"status": "skipped", "reason": f"out of time ({left:.0f} s of {budget:.0f} s left)"}  # fmt: skip
            else:
                result = run_stage(stage, limits[stage.name], left, args, log)
            report["stages"][stage.name] = result
            print(summary_line(stage.name, result), flush=True)
            write_report(json_path, report)
    report["total_s"] = round(budget - (deadline - time.perf_counter()), 1)
    write_report(json_path, report)
    print(f"gpu_check: results -> {json_path}\ngpu_check: log     -> {log_path}", flush=True)
    return int(any(r["status"] == "failed" for r in report["stages"].values()))


# ---- the child: one stage ----------------------------------------------------------------------
def run_child(args: argparse.Namespace) -> int:
    """Run stage `args.child` here; write {status, error, metrics} to results/<stage>.json."""
    sys.path.insert(0, str(ROOT))
    import gpu_check_stages as stages

    metrics: dict[str, Any] = {}  # a stage fills it as it goes: a failure keeps what it measured

    def stop(signum: int, frame: Any) -> None:
        raise TimeoutError("stopped by the driver: the stage ran out of its time")

    signal.signal(signal.SIGTERM, stop)
    try:
        stages.run(args.child, "cpu" if args.cpu else "cuda", args.out, metrics)
        result = {"status": "ok", "metrics": metrics}
    except BaseException as exc:  # noqa: BLE001  (the point is to record any failure)
        traceback.print_exc()
        message = last_line(f"{type(exc).__name__}: {exc}")
        result = {"status": "failed", "error": message, "metrics": metrics}
    write_report(args.out / "results" / f"{args.child}.json", result)
    return 0 if result["status"] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(f"{s.name:20s} {s.doc}" for s in STAGES))
        return 0
    if args.child:
        return run_child(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
