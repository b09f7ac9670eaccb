"""Checkpoint save / resume time and peak host memory: the old full-state `torch.save` path
against DCP (`pixio.runtime.checkpointing.CheckpointManager`).

    .venv/bin/python scripts/bench_checkpoint.py                  # the sizes in docs/checkpoints.md
    .venv/bin/python scripts/bench_checkpoint.py --models pixio_vits16 --repeats 1 --fsdp none

State: the MAE of each size (encoder + default 32-block decoder) with its AdamW state (fp32:
model + exp_avg + exp_avg_sq = 12 bytes per parameter). Every measurement runs in a fresh
process: time of the operation, and peak resident memory (ru_maxrss) minus the resident set just
before it, i.e. the extra host memory the operation needs. Before each load the checkpoint files
are dropped from the page cache (posix_fadvise DONTNEED), so reads come from the disk. `--fsdp`
runs the same comparison on 2 gloo processes with FSDP2 (the old path gathers the full state on
rank 0). Prints a markdown table of medians; takes minutes, and is not part of the test suite.

`--metadata-estimate pixio_vit5b16 256` instead times DCP's rank-0 planning and the `.metadata`
of a model sharded FSDP-style over that many ranks, from synthetic plans (no weights needed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixio import build_mae  # noqa: E402
from pixio.runtime import checkpointing as ckpt  # noqa: E402

GIB = 2**30


# ---- measuring --------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def drop_cache(path: Path) -> None:
    """Evict `path`'s files from the page cache (needs no privileges)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*"))


# ---- the state --------------------------------------------------------------------------------
def build(model_name: str, fsdp: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The MAE (optionally FSDP2-sharded) and AdamW with its state initialised."""
    torch.manual_seed(0)
    model = build_mae(model_name)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in [*model.blocks, *model.decoder_blocks]:
            fully_shard(unit)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    get_optimizer_state_dict(model, opt)  # initialises exp_avg / exp_avg_sq (a zero step)
    return model, opt


def train_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}


# ---- operations (one per child process) -------------------------------------------------------
def op_old_save(model, opt, where: Path) -> dict[str, float]:
    """What the trainer did before: the full state, gathered to rank 0, one torch.save."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    state = {
        "model": get_model_state_dict(model, options=full),
        "optimizer": get_optimizer_state_dict(model, opt, options=full),
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        where.parent.mkdir(parents=True, exist_ok=True)
        with open(where.with_suffix(".tmp"), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(where.with_suffix(".tmp"), where)
    if dist.is_initialized():
        dist.barrier()
    return {}


def op_old_load(model, opt, where: Path) -> dict[str, float]:
    """Before: rank 0 reads the full state, the state-dict API broadcasts it."""
    distributed = dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        state: dict[str, Any] = {"model": {}, "optimizer": {}}
    else:
        state = torch.load(where, map_location="cpu", weights_only=True)
    opts = StateDictOptions(
        full_state_dict=True, cpu_offload=distributed, broadcast_from_rank0=distributed
    )
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)
    return {}


def op_dcp_save(model, opt, where: Path, async_save: bool = False) -> dict[str, float]:
    manager = ckpt.CheckpointManager(where, keep_last=1, async_save=async_save)
    start = time.perf_counter()
    manager.save(1, train_state(model, opt), {"iteration": 1})
    returned = time.perf_counter() - start
    manager.close()
    return {"returned_s": returned} if async_save else {}


def op_dcp_load(model, opt, where: Path) -> dict[str, float]:
    state = train_state(model, opt)
    ckpt.CheckpointManager(where).load_latest(state)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optimizer"])
    return {}


def op_verify(model, opt, where: Path) -> dict[str, float]:
    """Hash every file against the manifest, in this one process."""
    path = ckpt.find_latest(where)
    problems = ckpt.check_files(path, ckpt.read_manifest(path)["files"], hashes=True)
    assert not problems, problems
    return {}


OPS = {
    "old-save": op_old_save,
    "old-load": op_old_load,
    "dcp-save": op_dcp_save,
    "dcp-async": lambda m, o, w: op_dcp_save(m, o, w, async_save=True),
    "dcp-load": op_dcp_load,
    "verify": op_verify,
}


def child(op: str, model_name: str, where: str, fsdp: bool) -> None:
    """Run one operation and print its measurements as JSON."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 if fsdp else 1)))
    if fsdp:
        dist.init_process_group("gloo")
    model, opt = build(model_name, fsdp)
    where_p = Path(where)
    if op.endswith("load") or op == "verify":
        drop_cache(where_p)
    base = rss_bytes()
    start = time.perf_counter()
    extra = OPS[op](model, opt, where_p)
    seconds = time.perf_counter() - start
    rank = dist.get_rank() if fsdp else 0
    print(
        json.dumps(
            {"rank": rank, "seconds": seconds, "peak_gib": (peak_bytes() - base) / GIB, **extra}
        )
    )
    if fsdp:
        dist.destroy_process_group()


# ---- DCP planning and metadata at scale ------------------------------------------------------
def _fsdp_chunks(size: torch.Size, ranks: int) -> list[tuple[list[int], list[int]]]:
    """(offsets, sizes) of each rank's dim-0 shard, as FSDP2 splits (empty shards dropped)."""
    if len(size) == 0:
        return [([], [])]
    rows = -(-size[0] // ranks)
    out = []
    for r in range(ranks):
        start = min(r * rows, size[0])
        n = min(rows, size[0] - start)
        if n > 0:
            out.append(([start] + [0] * (len(size) - 1), [n, *size[1:]]))
    return out


def _synthetic_plans(model_name: str, ranks: int) -> list[Any]:
    """Every rank's DCP save plan for the model's parameters and both AdamW moments."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem
    from torch.distributed.checkpoint.planner import WriteItemType as Kind

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in build_mae(model_name).named_parameters()}
    fqns = [(f"model.{n}", s) for n, s in shapes.items()]
    fqns += [(f"optimizer.state.{n}.{m}", s) for n, s in shapes.items() for m in ("exp_avg", "exp_avg_sq")]  # fmt: skip
    items: list[list[Any]] = [[] for _ in range(ranks)]
    props = TensorProperties(dtype=torch.float32)
    for fqn, size in fqns:
        for rank, (offsets, sizes) in enumerate(_fsdp_chunks(size, ranks)):
            chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
            data = TensorWriteData(chunk=chunk, properties=props, size=size)
            items[rank].append(WriteItem(MetadataIndex(fqn, offsets), Kind.SHARD, tensor_data=data))
    return [SavePlan(i) for i in items]


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def _rank0_save_work(model_name: str, ranks: int) -> tuple[bytes, dict[str, float]]:
    """Rank 0's serial share of a DCP save: plans gathered (unpickled) and scattered back
    (pickled), the global plan, the write results gathered, the metadata pickled."""
    import pickle

    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    blobs = [pickle.dumps(p) for p in _synthetic_plans(model_name, ranks)]  # on every rank
    plans, gather = _timed(lambda: [pickle.loads(b) for b in blobs])
    planner = DefaultSavePlanner(flatten_state_dict=False)
    (global_plans, md), plan = _timed(lambda: planner.create_global_plan(plans))
    _, scatter = _timed(lambda: [pickle.dumps(p) for p in global_plans])
    sent = [pickle.dumps([WriteResult(i.index, 1, _StorageInfo(f"__{r}_0.distcp", 0, 1))
                          for i in p.items]) for r, p in enumerate(plans)]  # fmt: skip
    results, collect = _timed(lambda: [pickle.loads(b) for b in sent])
    md.storage_data = {w.index: w.storage_data for ws in results for w in ws}
    blob, dump = _timed(lambda: pickle.dumps(md))
    chunks = sum(len(p.items) for p in plans)
    return blob, {"chunks": chunks, "rank0_plan_s": gather + plan + scatter,
                  "rank0_finish_s": collect + dump}  # fmt: skip


def estimate_metadata(model_name: str, ranks: int) -> dict[str, float]:
    """`_rank0_save_work`, then every resuming rank's `.metadata` read (restricted, plain)."""
    import io
    import pickle

    from pixio.safe_load import MetadataUnpickler

    blob, figures = _rank0_save_work(model_name, ranks)
    gc.collect()  # a resuming rank holds none of the save's objects
    _, restricted = _timed(lambda: MetadataUnpickler(io.BytesIO(blob)).load())
    gc.collect()
    _, plain = _timed(lambda: pickle.loads(blob))
    return {**figures, "metadata_mb": len(blob) / 1e6,
            "read_metadata_restricted_s": restricted, "read_metadata_plain_s": plain}  # fmt: skip


# ---- driver -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(op: str, model_name: str, where: Path, world: int = 1) -> list[dict[str, float]]:
    """One measurement in `world` fresh processes; each rank's JSON line."""
    args = [sys.executable, __file__, "--child", op, model_name, str(where)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    if world > 1:
        args.append("--child-fsdp")
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                         env={**env, "RANK": str(r), "WORLD_SIZE": str(world)})
        for r in range(world)
    ]  # fmt: skip
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{op} {model_name} failed")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def bench_model(model_name: str, root: Path, repeats: int, world: int) -> list[dict[str, Any]]:
    """Medians over `repeats` of every operation for one size (and world size)."""
    old, new, asyn = root / "old" / "checkpoint.pth", root / "dcp", root / "dcp-async"
    plan = ["old-save", "old-load", "dcp-save", "dcp-load", "dcp-async"]
    if world == 1:
        plan.append("verify")
    where = {"old-save": old, "old-load": old, "dcp-async": asyn}
    samples: dict[str, list[list[dict]]] = {op: [] for op in plan}
    for _ in range(repeats):
        for op in plan:
            samples[op].append(run(op, model_name, where.get(op, new), world))
    sizes = {"old": dir_bytes(old), "dcp": dir_bytes(ckpt.find_latest(new))}
    shutil.rmtree(root, ignore_errors=True)
    return [_row(model_name, world, op, runs, sizes) for op, runs in samples.items()]


def _row(model_name: str, world: int, op: str, runs: list[list[dict]], sizes: dict) -> dict:
    def med(key: str, rank: int | None = None) -> float:
        return statistics.median(
            max(r[key] for r in ranks) if rank is None else ranks[rank][key] for ranks in runs
        )

    row = {"model": model_name, "ranks": world, "op": op, "seconds": med("seconds"),
           "peak_gib_rank0": med("peak_gib", 0), "peak_gib_max": med("peak_gib"),
           "ckpt_gib": sizes["old" if op.startswith("old") else "dcp"] / GIB}  # fmt: skip
    if op == "dcp-async":
        row["returned_s"] = med("returned_s")
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | ranks | operation | checkpoint GiB | time s (async: returns after) | extra host memory GiB, rank 0 / max |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = f"{r['seconds']:.1f}" + (f" ({r['returned_s']:.1f})" if "returned_s" in r else "")
        lines.append(
            f"| {r['model']} | {r['ranks']} | {r['op']} | {r['ckpt_gib']:.2f} | {t} | "
            f"{r['peak_gib_rank0']:.2f} / {r['peak_gib_max']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="*", default=["pixio_vits16", "pixio_vitb16", "pixio_vitl16"]
    )
    parser.add_argument(
        "--fsdp", default="pixio_vitb16", help="model for the 2-process run, or none"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/pixio-bench-checkpoint", help="scratch directory")
    parser.add_argument(
        "--child", nargs=3, metavar=("OP", "MODEL", "WHERE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--child-fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--metadata-estimate", nargs=2, metavar=("MODEL", "RANKS"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child, fsdp=args.child_fsdp)
    if args.metadata_estimate:
        name, ranks = args.metadata_estimate
        return print(json.dumps(estimate_metadata(name, int(ranks))))
    if args.metadata_estimate:
        name, ranks = args.metadata_estimate
        return print(json.dumps(estimate_metadata(name, int(ranks))))
    rows = []
    for name in args.models:
        rows += bench_model(name, Path(args.dir) / name, args.repeats, 1)
        print(table(rows), flush=True)
    if args.fsdp != "none":
        rows += bench_model(args.fsdp, Path(args.dir) / f"{args.fsdp}-fsdp", args.repeats, 2)
    print(table(rows))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
