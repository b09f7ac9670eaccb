"""A training iteration makes the host wait for the device only when it logs (or saves, validates,
draws): every host read of a tensor is counted per iteration with a TorchFunctionMode over real
runs of tiny pre-training, distillation and evaluation-head tasks. Also: the logged TFLOP/s and
MFU, each task's FLOPs against torch's FlopCounterMode, a NaN caught before a save that would
hold it, and the asynchronous stop agreement (one iteration late unless the iteration waited for
the device anyway), in one process and across two."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_stop_signals import FailsOnRank1
from tests_helpers import CPU_OVERRIDES, compose_pretrain, free_port, start_ranks
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode
from trainer_tasks import HeadTask as RegressionTask
from trainer_tasks import Regression, encoder_and_head, task_config

import pixio
from distillation.model import build_student
from distillation.task import DistillTask, student_module
from evaluation.features import FrozenFeatures
from evaluation.heads import build_head, head_block_ids
from evaluation.task import DepthTask, SegmentationTask, Windows
from pixio.models.flops import mae_model_flops
from pixio.runtime import checkpointing
from pixio.runtime.config import to_container
from pixio.runtime.distributed import DistInfo
from pixio.runtime.maploader import MapLoader
from pixio.runtime.preemption import PREEMPTED_EXIT_CODE
from pixio.runtime.trainer import NonFiniteLossError, Trainer
from pretraining.task import MAETask
from pretraining.train import build_model

pytestmark = pytest.mark.timeout(300)

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOG_EVERY, ITERATIONS = 3, 8  # logs after iterations 3, 6 and 8 (the last)

# What makes the host wait for a tensor's value (on a GPU: for every kernel queued before it).
READS = frozenset(
    {"item", "tolist", "__float__", "__bool__", "__int__", "__index__", "cpu", "numpy",
     "nonzero", "masked_select", "equal", "allclose", "is_nonzero"}
)  # fmt: skip


class DeviceReads(TorchFunctionMode):
    """Counts host reads of tensors (`READS`, and indexing by a boolean mask) by the number of
    iterations the trainer had done when each happened, with the first frame outside torch."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.reads: dict[int, list[str]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name in ("__getitem__", "__setitem__") and _is_mask(args[1])
        if name in READS or masked:
            self.reads[self.trainer.progress.iteration].append(f"{name} at {_caller()}")
        return func(*args, **(kwargs or {}))


def _is_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return "?"


def count_reads(trainer: Trainer) -> dict[int, list[str]]:
    with DeviceReads(trainer) as counter:
        trainer.fit()
    return counter.reads


def assert_reads_only_when_logging(reads: dict[int, list[str]]) -> None:
    """Reads counted at k happened after iteration k's step (its log line) or in step k + 1:
    only the logging iterations may have any (the run neither saves nor validates before its
    end, which logs too)."""
    for done in range(ITERATIONS):
        if done == 0 or done % LOG_EVERY:
            assert not reads.get(done), f"host reads after {done} iterations: {reads[done]}"
    for done in (3, 6, 8):  # the counter does see the reads of a log line
        assert reads.get(done), f"no read counted when logging after iteration {done}"


def pretrain_config(tmp_path: Path, *extra: str):
    return compose_pretrain(
        [*CPU_OVERRIDES, f"output_dir={tmp_path / 'run'}", "data.root=unused",
         f"train.log_every={LOG_EVERY}", "train.epochs=1", f"train.iters_per_epoch={ITERATIONS}",
         "train.save_every_iters=1000", "optim.fused=true", "optim.clip_grad=1.0", *extra]
    )  # fmt: skip


def mae_batches(n: int, batch: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(batch, 3, 64, 64, generator=g), "noise": torch.rand(batch, 4, generator=g)}
        for _ in range(n)
    ]  # fmt: skip


def mae_trainer(cfg, batches) -> Trainer:
    torch.manual_seed(0)
    task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim)
    return Trainer(cfg, task, batches, SINGLE, to_container(cfg))


def head_config(tmp_path: Path, **train):
    # fused AdamW: the unfused one reads its step counters on the host (CPU tensors, even when
    # training on a GPU, so not a device read; fused keeps them with the kernel).
    return task_config(
        tmp_path / "run", optim={"fused": True, "clip_grad": 1.0}, batch_size=2,
        log_every=LOG_EVERY, epochs=1, iters_per_epoch=ITERATIONS, **train,
    )  # fmt: skip


def distill_task(cfg) -> DistillTask:
    torch.manual_seed(0)
    teacher = pixio.build_encoder("pixio_vitt16", img_size=64, embed_dim=32, depth=2, num_heads=2)
    sizes = {"pixio_vitt16": (16, 1), "pixio_vits16": (24, 2)}
    students = {
        student_module(n): build_student(n, 32, 2, img_size=64, embed_dim=d, depth=k, num_heads=2)
        for n, (d, k) in sizes.items()
    }
    loss = OmegaConf.create({"cls": "cosine", "patch": "cosine", "fuse": "avg"})
    return DistillTask(teacher, students, None, loss, 0.5, cfg.optim)


def head_task(cfg, app: str, kind: str) -> DepthTask | SegmentationTask:
    """A depth or segmentation task on a tiny frozen Pixio encoder (4 blocks) and a head."""
    torch.manual_seed(0)
    encoder = pixio.build_encoder("pixio_vitt16", img_size=32, embed_dim=32, depth=4, num_heads=2)
    features = FrozenFeatures(encoder, head_block_ids(kind, 4))
    windows = Windows(32, 32, 2)
    if app == "depth":
        head = build_head(kind, 32, 1)
        return DepthTask(features, head, cfg.optim, windows, min_depth=1e-3, max_depth=10.0)
    return SegmentationTask(features, build_head(kind, 32, 5), cfg.optim, windows, num_classes=5)


def head_batches(app: str, n: int, batch: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        item = {"image": torch.randn(batch, 3, 32, 32, generator=g)}
        if app == "depth":  # metres, a quarter of the pixels without a measurement (0)
            depth = 10 * torch.rand(batch, 1, 32, 32, generator=g)
            item["depth"] = depth * (torch.rand(depth.shape, generator=g) > 0.25)
        else:  # classes 0-4 and 255 (ignored)
            mask = torch.randint(0, 5, (batch, 32, 32), generator=g)
            item["mask"] = torch.where(torch.rand(mask.shape, generator=g) < 0.2, 255, mask)
        out.append(item)
    return out


# ---- no host read on a non-logging iteration ----------------------------------------------
def test_pretraining_reads_the_device_only_when_it_logs(tmp_path):
    trainer = mae_trainer(pretrain_config(tmp_path, "train.accum_iter=2"), mae_batches(ITERATIONS))
    assert_reads_only_when_logging(count_reads(trainer))


def test_distillation_reads_the_device_only_when_it_logs(tmp_path):
    cfg = head_config(tmp_path)
    trainer = Trainer(cfg, distill_task(cfg), mae_batches(ITERATIONS, 2), SINGLE, {"job": "d"})
    assert_reads_only_when_logging(count_reads(trainer))


@pytest.mark.parametrize("app", ["depth", "segmentation"])
def test_evaluation_heads_read_the_device_only_when_they_log(tmp_path, app):
    cfg = head_config(tmp_path)
    data = head_batches(app, ITERATIONS)
    trainer = Trainer(cfg, head_task(cfg, app, "linear"), data, SINGLE, {"job": "head"})
    assert_reads_only_when_logging(count_reads(trainer))


# ---- TFLOP/s and MFU --------------------------------------------------------------------------
def logged(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("peak", [None, 0.01])
def test_tflops_and_mfu_are_logged_from_the_task_flops_and_the_step_time(tmp_path, peak):
    extra = [] if peak is None else [f"train.peak_tflops={peak}"]
    trainer = mae_trainer(pretrain_config(tmp_path, *extra), mae_batches(ITERATIONS))
    trainer.fit()
    flops = mae_model_flops(trainer.task.model, 64, 64, 0.75).train
    assert flops == trainer.task.flops_per_sample(mae_batches(1)[0])
    records = logged(trainer.output_dir)
    assert [r["step"] for r in records] == [3, 6, 8]
    for r in records:  # one process: model TFLOP/s = FLOPs per image x images per second
        assert r["tflops"] == pytest.approx(flops * r["images_per_s"] / 1e12, rel=1e-9)
        if peak is None:
            assert "mfu" not in r  # the CPU has no known peak
        else:
            assert r["mfu"] == pytest.approx(r["tflops"] / peak, rel=1e-9)


def counted_step_flops(task, modules: dict, batch: dict) -> int:
    """What torch counts for one training step of `task` (forward and backward). Attention in
    its math form: the counter has no formula for the CPU's fused attention kernel."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        task.step(modules, batch).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("job", ["mae", "distill", "depth-dpt", "segmentation-linear"])
def test_each_tasks_flops_per_sample_matches_torchs_count_of_its_step(tmp_path, job):
    cfg = pretrain_config(tmp_path) if job == "mae" else head_config(tmp_path)
    with torch.device("meta"):  # counted, not computed
        if job == "mae":
            task, batch = MAETask(build_model(cfg), 0.75, cfg.optim), mae_batches(1)[0]
        elif job == "distill":
            task, batch = distill_task(cfg), mae_batches(1, 2)[0]
        else:
            app, kind = job.split("-")
            task, batch = head_task(cfg, app, kind), head_batches(app, 1)[0]
    batch = {k: v.to("meta") for k, v in batch.items()}
    modules = {n: s.module for n, s in task.modules().items()}
    expected = task.flops_per_sample(batch) * batch["image"].shape[0]
    assert expected == counted_step_flops(task, modules, batch)  # exact, not just close


def test_peak_tflops_must_be_positive(tmp_path):
    from pixio.runtime.config import ConfigError, check_train

    with pytest.raises(ConfigError, match="train.peak_tflops: must be positive"):
        check_train(pretrain_config(tmp_path, "train.peak_tflops=0").train)


class SlowBatches:
    """`n` regression batches, each taking `seconds` to produce (a slow data pipeline)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.batches = [next(iter(MapLoader(Regression(2), 2).iterate(0))) for _ in range(n)]
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.seconds)
            yield batch


def test_data_wait_counts_each_fetch_once(tmp_path):
    """The fetch of batch k + 1 runs inside iteration k (one batch ahead): data_wait is the
    share of the iteration spent there, near 1 when the data is the bottleneck, never above."""
    cfg = task_config(tmp_path / "run", epochs=1, log_every=6)
    encoder, head = encoder_and_head()
    task = RegressionTask(encoder, head, cfg.optim)
    Trainer(cfg, task, SlowBatches(6, 0.05), SINGLE, {"job": "head"}).fit()
    (record,) = logged(tmp_path / "run")
    assert 0.5 < record["data_wait"] <= 1.0, record


# ---- non-finite losses ------------------------------------------------------------------------
def test_a_nan_between_log_lines_is_caught_before_the_save_that_would_hold_it(tmp_path):
    batches = mae_batches(ITERATIONS)
    batches[4]["image"][0, 0, 0, 0] = float("nan")  # iteration 4; logs after 3, 6, 8
    cfg = pretrain_config(tmp_path, "train.log_every=6", "train.save_every_iters=2")
    trainer = mae_trainer(cfg, batches)
    with pytest.raises(NonFiniteLossError, match="loss is nan at iteration 4 .checked iterations 4 to 5"):  # fmt: skip
        trainer.fit()  # the save due after iteration 6 checks first
    with pytest.raises(NonFiniteLossError, match="at iteration 4"):
        trainer.save()  # a non-finite loss once found is not forgotten
    meta = checkpointing.read_meta(trainer.output_dir / "checkpoint-last")
    assert meta["iteration"] == 4  # saved after iterations 2 and 4, never 6
    assert not (trainer.output_dir / "encoder.safetensors").exists()


# ---- the asynchronous stop agreement ----------------------------------------------------------
def regression_trainer(out: Path, **train) -> Trainer:
    cfg = task_config(out, **train)
    encoder, head = encoder_and_head()
    data = MapLoader(Regression(12), 2, seed=cfg.train.seed)  # 6 iterations per epoch
    return Trainer(cfg, RegressionTask(encoder, head, cfg.optim), data, SINGLE, {"job": "head"})


def sigterm_at(trainer: Trainer, k: int) -> None:
    """SIGTERM to this process at the start of training iteration k."""
    original = trainer.train_iteration

    def train_iteration(it, batch):
        if it == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(it, batch)

    trainer.train_iteration = train_iteration


@pytest.mark.parametrize(
    ("signal_at", "saved_at"),
    # log_every 4 (after 4, 8, 12, 16 and 18); no validation data; saves only at the end.
    [(5, 7), (3, 4), (7, 8)],  # one iteration late; at once when the step logged (twice)
)
def test_a_stop_signal_is_acted_on_one_iteration_late_unless_the_device_was_waited_for(
    tmp_path, signal_at, saved_at
):
    full = regression_trainer(tmp_path / "full", log_every=4)
    full.fit()
    part = regression_trainer(tmp_path / "part", log_every=4)
    sigterm_at(part, signal_at)
    with pytest.raises(SystemExit) as stopped:
        part.fit()
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert checkpointing.read_meta(tmp_path / "part" / "checkpoint-last")["iteration"] == saved_at
    resumed = regression_trainer(tmp_path / "part", log_every=4)
    resumed.fit()
    for key, value in full.full_state().items():
        assert torch.equal(value, resumed.full_state()[key]), key


def _two_rank_worker(rank: int, port: int, out: str, case: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from pixio.runtime.distributed import cleanup, init_distributed

    info = init_distributed(device="cpu")
    cfg = task_config(Path(out), batch_size=2, log_every=4)
    encoder, head = encoder_and_head()
    fail_at = 11 if case == "fail" else 0  # the first sample of iteration 5 (2 per batch)
    data = MapLoader(FailsOnRank1(24, rank, fail_at), 2, rank, 2, seed=0)  # 6 per epoch
    trainer = Trainer(cfg, RegressionTask(encoder, head, cfg.optim), data, info, {"job": "head"})
    if case == "signal" and rank == 1:
        sigterm_at(trainer, 5)  # rank 1 only: rank 0 hears of it through the agreement
    try:
        trainer.fit()
        outcome = "finished"
    except SystemExit as stop:
        outcome = f"exit {stop.code}"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(out, f"rank{rank}.txt").write_text(outcome)
    cleanup()


@pytest.mark.parametrize("case", ["signal", "fail"])
def test_two_ranks_agree_asynchronously_on_a_signal_or_a_failed_fetch(tmp_path, case):
    port = free_port()
    # a rank's error is raised here; hung ranks are killed after the timeout
    start_ranks(_two_rank_worker, args=(port, str(tmp_path), case), nprocs=2, timeout=150)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    meta = checkpointing.read_meta(tmp_path / "checkpoint-last")
    if case == "signal":  # during step 5 (no log after it): agreed after step 6, on both ranks
        assert outcomes == [f"exit {PREEMPTED_EXIT_CODE}"] * 2 and meta["iteration"] == 7
    else:  # a failed fetch is never late: no rank steps without its batch
        assert outcomes[1].startswith("OSError: cannot read sample ")
        assert outcomes[0].startswith("RuntimeError: rank 1's data loader failed after iteration 5")
        assert meta["iteration"] == 5
