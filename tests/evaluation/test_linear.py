"""The ImageNet linear probe (`python -m evaluation.linear`) on CPU: colour classes a probe on a
tiny random encoder separates; an lr grid whose heads equal single-lr runs of the same seed with
one encoder forward per batch; an exact resume under gradient accumulation; two gloo processes
counting every validation image once; the webdataset form of a split read as its ImageFolder;
results.json in the evaluations' schema and its report rows; the FLOPs per sample against
torch's count; bad data and config errors naming the culprit; the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import REPO, TINY_ENCODER, read_json, save_tiny_encoder
from launch_helpers import record_launches, run_app
from PIL import Image
from tests_helpers import free_port, start_ranks

import evaluation.linear as linear
import evaluation.linear_job as linear_job
import pixio
from evaluation import report
from evaluation.choices import head_name
from evaluation.grid import build_grid, head_results, reported_head
from evaluation.linear_data import CentreCrop, LabelledImages, build_indexes
from evaluation.results import read_results
from pixio.data.make_shards import main as make_shards
from pixio.runtime import checkpointing
from pixio.runtime.config import ConfigError, OptimConfig
from pixio.runtime.distributed import DistInfo
from pixio.runtime.validation import add_real

COLOURS = {"blue": (30, 60, 200), "green": (40, 170, 60), "red": (200, 40, 40)}


def colour_folder(root: Path, per_split: dict[str, int]) -> Path:
    """An ImageFolder of noisy solid-colour JPEGs (the class is the colour), sizes varied."""
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(36, 64)), int(rng.integers(36, 64)), 3)
                noisy = np.clip(np.asarray(rgb) + rng.normal(0, 30, size), 0, 255)
                Image.fromarray(noisy.astype(np.uint8)).save(root / split / name / f"{i:02d}.jpg", quality=95)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("linear")
    encoder = save_tiny_encoder(base / "encoder.safetensors")
    return encoder, colour_folder(base / "colours", {"train": 16, "val": 6})


def overrides(encoder: Path, root: Path, out: Path, **extra: object) -> list[str]:
    """A tiny CPU probe: 32 px crops of the colour folder, batch 8 (6 iterations per epoch)."""
    values = {
        "encoder.name": "pixio_vitt16", "encoder.checkpoint": str(encoder),
        **{f"encoder.{k}": v for k, v in TINY_ENCODER.items()},
        "data.root": str(root), "data.num_workers": 0, "data.resize": 32, "data.crop": 32,
        "linear.global_batch": "null", "head.lrs": "[64.0]", "optim.warmup_epochs": 1,
        "train.batch_size": 8, "train.epochs": 6, "train.save_every_iters": 1000,
        "train.log_every": 6, "train.val_every": 2, "train.precision": "fp32",
        "train.device": "cpu", "logger": "none", "launcher": "local", "output_dir": str(out),
        **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def compose(args: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=linear.CONFIG_DIR, version_base=None):
        return hydra_compose("eval_linear", args)


def heads(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return checkpointing.load_checkpoint(out / "checkpoint-last", ("model",))["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_colour_classes_are_learned_and_results_follow_the_schema(inputs, tmp_path):
    encoder, root = inputs
    out = tmp_path / "run"
    # Full batches (48 images, 1 iteration per epoch): LARS leaves the bias unscaled, and with
    # 3 classes a small batch's bias gradient is noise that outgrows the slowly moving weight.
    full = {"train.batch_size": 48, "train.epochs": 30, "train.val_every": 10, "optim.warmup_epochs": 5}  # fmt: skip
    results = linear_job.run_linear(compose(overrides(encoder, root, out, **full)))
    assert results == read_json(out / "results.json")
    assert (results["task"], results["dataset"], results["head"], results["metric"]) == ("linear", "imagenet", "cls", "top1")  # fmt: skip
    assert results["best"]["top1"] >= 90, results["epochs"]
    assert [e["epoch"] for e in results["epochs"]] == [10.0, 20.0, 30.0]
    assert results["reported_head"] == "head_lr64" and results["best"]["head"] == "head_lr64"
    assert results["final"] == {"label": "final epoch", "head": "head_lr64", **results["grid"]["head_lr64"]["final"]}  # fmt: skip
    assert results["grid"]["head_lr64"]["lr"] == 64 * 48 / 256 and results["global_batch"] == 48
    assert (results["n_train"], results["n_val"], results["num_classes"], results["feature_dim"]) == (48, 18, 3, 32)  # fmt: skip
    assert results["protocol"]["crop"] == 32 and not results["protocol"]["as_reference"]
    assert results["encoder"]["random_weights"] is False and results["demo"] is False
    # Only the heads are trained and saved: BatchNorm statistics (no affine) and the Linear.
    assert set(heads(out)) == {"head_lr64"}
    assert sorted(heads(out)["head_lr64"]) == ["0.num_batches_tracked", "0.running_mean", "0.running_var", "1.bias", "1.weight"]  # fmt: skip
    # The report: one linear row, side by side too (a trained encoder on real data).
    assert read_results(out / "results.json") == results
    rows, skipped = report.collect(tmp_path)
    assert not skipped and [(r.task, r.head, r.best, r.grid) for r in rows] == [("linear", "cls", results["best"]["top1"], False)]  # fmt: skip
    assert "\nlinear  imagenet  cls " in report.format_comparison(rows)


@pytest.mark.slow
def test_grid_heads_equal_single_lr_runs_with_one_encoder_forward_per_batch(inputs, tmp_path, monkeypatch):  # fmt: skip
    encoder, root = inputs
    calls = []
    real = linear_job.pooled_features
    monkeypatch.setattr(linear_job, "pooled_features", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))  # fmt: skip
    short = {"train.epochs": 2, "train.val_every": 1}
    runs = {"grid": "[0.5,64.0]", "low": "[0.5]", "high": "[64.0]"}
    counted = {}
    for run, lrs in runs.items():
        calls.clear()
        linear_job.run_linear(compose(overrides(encoder, root, tmp_path / run, **short, **{"head.lrs": lrs})))  # fmt: skip
        counted[run] = list(calls)
    # 12 training batches of 8 and 2 validations of 18 images (batches of 8, 8, 2): the same
    # encoder calls whatever the number of heads.
    assert counted["grid"] == counted["low"] == counted["high"] == ([8] * 6 + [8, 8, 2]) * 2
    grid, lo, hi = (heads(tmp_path / run) for run in runs)
    assert set(grid) == {"head_lr0.5", "head_lr64"}
    assert same(grid["head_lr0.5"], lo["head_lr0.5"]) and same(grid["head_lr64"], hi["head_lr64"])
    assert not same(grid["head_lr0.5"], grid["head_lr64"])
    r_grid, r_lo = (read_json(tmp_path / run / "results.json") for run in ("grid", "low"))
    assert r_grid["grid"]["head_lr0.5"]["best"] == r_lo["grid"]["head_lr0.5"]["best"]
    # The report lists the reported head's row and, for a grid, one row per head.
    rows, _ = report.collect(tmp_path / "grid")
    assert [(r.head, r.grid) for r in rows] == [("cls", False), ("cls head_lr0.5", True), ("cls head_lr64", True)]  # fmt: skip
    assert "head_lr0.5" not in report.format_comparison(rows)


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_uninterrupted_result(inputs, tmp_path):
    encoder, root = inputs
    # Accumulation over 2 batches of 8 (global batch 16), two heads (dotted names in the
    # checkpoint's keys), saves every 4 iterations, stopped mid-epoch 2 after a save.
    extra = {"linear.global_batch": 16, "head.lrs": "[0.5,64.0]", "train.save_every_iters": 4, "train.epochs": 3, "train.val_every": 1}  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    linear_job.run_linear(compose(overrides(encoder, root, full, **extra)))
    assert linear_job.run_linear(compose(overrides(encoder, root, part, **extra, **{"train.max_iters": 8}))) is None  # fmt: skip
    assert not (part / "results.json").exists()
    linear_job.run_linear(compose(overrides(encoder, root, part, **extra)))
    a, b = heads(full), heads(part)
    assert a.keys() == b.keys() == {"head_lr0.5", "head_lr64"}
    assert all(same(a[k], b[k]) for k in a)
    ra, rb = read_json(full / "results.json"), read_json(part / "results.json")
    assert ra["config"]["train"]["accum_iter"] == 2 and ra["global_batch"] == 16
    for key in ("best", "final", "epochs", "grid"):
        assert ra[key] == rb[key], key


def _worker(rank: int, world: int, port: int, args: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    linear_job.run_linear(compose(args))


@pytest.mark.slow
def test_two_processes_count_every_validation_image_once(inputs, tmp_path):
    encoder, _ = inputs
    root = colour_folder(tmp_path / "odd", {"train": 16, "val": 5})  # 15 images: one padded
    out = tmp_path / "two"
    args = overrides(encoder, root, out, **{"head.lrs": "[0.5,64.0]", "train.epochs": 2, "linear.global_batch": 16})  # fmt: skip
    start_ranks(_worker, (2, free_port(), args), nprocs=2)
    results = read_json(out / "results.json")
    assert results["global_batch"] == 16 and results["config"]["train"]["accum_iter"] == 1
    assert results["epochs"][-1]["samples"] == 15
    # Each head's final numbers are those of its saved weights over the whole set in one process.
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    task = linear_job.build_task(compose(args), cpu, 3)
    saved = heads(out)
    for h in task.grid:
        h.module.load_state_dict(saved[h.name])
        h.module.eval()
    val = LabelledImages(build_indexes(root)[1], CentreCrop(32, 32))
    totals: dict[str, torch.Tensor] = {}
    for i in range(len(val)):
        batch = task.to_device({k: torch.as_tensor(v)[None] for k, v in val[i].items()}, cpu.device)  # fmt: skip
        add_real(totals, task.validate({"encoder": task.features, **{h.name: h.module for h in task.grid}}, batch), torch.tensor([True]))  # fmt: skip
    totals["samples"] = torch.tensor(15.0, dtype=torch.float64)
    expected = task.summarize(totals)
    for name, head in results["grid"].items():
        assert head["final"]["top1"] == pytest.approx(expected[f"{name}/top1"]), name
        assert head["final"]["top5"] == pytest.approx(expected[f"{name}/top5"]), name


def test_webdataset_shards_read_as_the_image_folder(inputs, tmp_path):
    _, root = inputs
    for split in ("train", "val"):  # kind web: a prefix without "train" for the val shards
        make_shards(["--images", str(root / split), "--out", str(tmp_path / "in_folders" / split), "--kind", "web", "--labels-from-dirs", "--shard-size", "10"])  # fmt: skip
        make_shards(["--images", str(root / split), "--out", str(tmp_path / "flat"), "--kind", "web", "--prefix", f"imagenet1k-{split}", "--labels-from-dirs", "--shard-size", "10"])  # fmt: skip

    def items(index) -> list[tuple[int, bytes]]:
        data = LabelledImages(index, CentreCrop(32, 32))
        return sorted((int(data[i]["label"]), data[i]["image"].numpy().tobytes()) for i in range(len(data)))  # fmt: skip

    train, val, classes = build_indexes(root)
    assert (len(train), len(val), classes) == (48, 18, 3)
    for shards in (tmp_path / "in_folders", tmp_path / "flat"):
        s_train, s_val, s_classes = build_indexes(shards)
        assert s_classes == 3 and len(s_train.files) == 5  # ceil(48 / 10) tars
        assert items(s_train) == items(train) and items(s_val) == items(val)  # JPEG bytes copied


def test_bad_data_and_config_name_the_culprit(inputs, tmp_path, capsys):
    encoder, root = inputs
    (tmp_path / "mixed/train/red").mkdir(parents=True)
    (tmp_path / "mixed/val/blue").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"data.root: train/ and val/ hold different classes"):
        build_indexes(tmp_path / "mixed")
    (tmp_path / "mixed/val/blue").rmdir()
    (tmp_path / "mixed/val/0.tar").touch()
    with pytest.raises(ConfigError, match=r"holds class folders for one split and .tar shards for the other"):  # fmt: skip
        build_indexes(tmp_path / "mixed")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat/imagenet-train-val-0.tar").touch()
    with pytest.raises(ConfigError, match="imagenet-train-val-0.tar names both train and val"):
        build_indexes(tmp_path / "flat")
    cases = [
        ({"optim.lr": 0.1}, "optim.lr: the lrs are head.lrs"),
        ({"head.lrs": "[]"}, "head.lrs: needs at least one lr"),
        (
            {"head.lrs": "[0.1,0.10]"},
            r"head.lrs: holds the same lr twice \(head_lr0.1, head_lr0.1\)",
        ),  # fmt: skip
        ({"linear.feature": "mean"}, "linear.feature: must be one of cls, avgpool, both"),
        (
            {"data.crop": 40},
            "data.crop: 40 is not a positive multiple of the encoder's patch size 16",
        ),  # fmt: skip
        ({"data.crop_scale": "[0.5,0.2]"}, r"data.crop_scale: must be \[min, max\]"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            linear_job.run_linear(compose(overrides(encoder, root, tmp_path / "refused", **extra)))
    # The process count is known inside the job: one `config error:` line, exit 2.
    in_job = [
        (
            {"linear.global_batch": 12},
            "linear.global_batch: 12 is not a multiple of train.batch_size x processes = 8 x 1",
        ),  # fmt: skip
        (
            {"linear.global_batch": 32, "train.accum_iter": 3, "train.save_every_iters": 3},
            "train.accum_iter: is 3, but linear.global_batch=32 needs 4",
        ),  # fmt: skip
        (
            {"linear.global_batch": 32, "train.save_every_iters": 6},
            "train.save_every_iters: 6 is not a multiple of train.accum_iter = 4",
        ),  # fmt: skip
    ]
    for extra, message in in_job:
        with pytest.raises(SystemExit) as exit_info:
            linear_job.run_linear(compose(overrides(encoder, root, tmp_path / "refused", **extra)))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"config error: {message}" in err, err


def test_an_unreadable_image_stops_the_run_naming_it(inputs, tmp_path, capsys):
    encoder, root = inputs
    copy = Path(shutil.copytree(root, tmp_path / "colours"))
    bad = copy / "train/green/03.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    with pytest.raises(SystemExit) as exit_info:
        linear_job.run_linear(compose(overrides(encoder, copy, tmp_path / "out", **{"train.batch_size": 48})))  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"error: cannot read image {bad}: corrupt_image" in err, (
        err
    )


def test_the_command_line_entry_checks_before_launching(inputs, tmp_path, monkeypatch, capsys):
    encoder, root = inputs
    launched = record_launches(monkeypatch)
    args = overrides(encoder, root, tmp_path / "out")
    assert run_app("evaluation.linear", [*args, "+train.epoch=1"], monkeypatch, capsys) == (2, "config error: train.epoch: unknown key (a '+' override adds it, but nothing reads it); did you mean train.epochs?\n")  # fmt: skip
    assert run_app("evaluation.linear", [*args, "optim.name=sgd"], monkeypatch, capsys) == (2, "config error: optim.name: must be one of adamw, lars; got 'sgd'\n")  # fmt: skip
    assert not launched and not (tmp_path / "out").exists()
    recipe = [a for a in args if a.split("=")[0].startswith(("encoder.", "data.root", "output_dir", "logger"))]  # fmt: skip
    assert run_app("evaluation.linear", ["experiment=linear_imagenet", *recipe], monkeypatch, capsys)[0] == 0  # fmt: skip
    (cfg,) = launched
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.train.epochs) == ("lars", 0.0, 10.0, 90)  # fmt: skip
    assert (cfg.linear.global_batch, cfg.train.batch_size, list(cfg.head.lrs)) == (16384, 256, [0.1])  # fmt: skip


def test_an_output_dir_of_another_run_is_refused(inputs, tmp_path):
    encoder, root = inputs
    out = tmp_path / "run"
    out.mkdir()
    record = {"task": "linear", "dataset": "imagenet", "head": "avgpool", "metric": "top1", "reported_head": "head_lr1",
              "best": {"top1": 50.0}, "final": {"top1": 40.0}, "grid": {"head_lr1": {"best": {"top1": 50.0}, "final": {"top1": 40.0}}},
              "encoder": {"source": "pixio", "name": "pixio_vitt16", "sha256": None}}  # fmt: skip
    (out / "results.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"output_dir: .* holds the results of another run \(results.json: linear imagenet avgpool of pixio_vitt16"):  # fmt: skip
        linear.validate_linear(compose(overrides(encoder, root, out)))
    assert linear.validate_linear(compose(overrides(encoder, root, out, **{"linear.feature": "avgpool"})))  # fmt: skip
    (out / "results.json").write_text(json.dumps({**record, "grid": {}}))
    with pytest.raises(ConfigError, match=r"output_dir: .*results.json: `grid` is \{\}, not the heads' results"):  # fmt: skip
        linear.validate_linear(compose(overrides(encoder, root, out, **{"linear.feature": "avgpool"})))  # fmt: skip


def test_flops_per_sample_are_torch_s_count_of_the_step():
    """On the meta device (where torch counts the attention too), as tests/models/test_flops.py."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        features = linear_job.PooledFeatures(pixio.build_encoder("pixio_vitt16", **TINY_ENCODER), "both")  # fmt: skip
        grid = build_grid([1.0, 2.0], lambda: linear_job.linear_head(features.dim, 7), OptimConfig(name="lars"), "blr")  # fmt: skip
        batch = {"image": torch.empty(4, 3, 48, 32), "label": torch.zeros(4, dtype=torch.long)}
    task = linear_job.LinearProbeTask(features, grid, 7)
    modules = {"encoder": features, **{h.name: h.module for h in grid}}
    with FlopCounterMode(display=False) as counter:
        task.step(modules, batch).loss.backward()
    # Encoder forward (patch embedding, blocks) and, per head, forward + weight gradient.
    assert task.flops_per_sample(batch) * 4 == counter.get_total_flops()


def test_the_reported_head_is_the_best_over_epochs_first_of_equals():
    epochs = [{"epoch": 1.0, "iteration": 4, "a/top1": 50.0, "a/top5": 90.0, "b/top1": 60.0, "b/top5": 80.0},
              {"epoch": 2.0, "iteration": 8, "a/top1": 70.0, "a/top5": 95.0, "b/top1": float("nan"), "b/top5": 0.0},
              {"epoch": 3.0, "iteration": 12, "a/top1": 65.0, "a/top5": 96.0, "b/top1": 70.0, "b/top5": 85.0}]  # fmt: skip
    results = head_results(epochs, ["a", "b"], ["top1", "top5"])
    assert results["a"]["best"] == {"epoch": 2.0, "iteration": 8, "top1": 70.0, "top5": 95.0}
    assert results["b"]["best"]["epoch"] == 3.0 and results["a"]["final"]["top1"] == 65.0
    assert reported_head(results, "top1") == "a"  # 70 = 70: the first in the list
    assert reported_head(results, "top1", mode="min") == "a"  # 50 < 60
    assert [head_name(v) for v in (0.1, 1e-5, 64.0, 2.5e-4)] == ["head_lr0.1", "head_lr1e-05", "head_lr64", "head_lr0.00025"]  # fmt: skip


@pytest.mark.slow
def test_the_demo_runs_and_learns(tmp_path):
    """`python -m evaluation.linear experiment=linear_demo` on random weights (no make-demo
    encoder at the path), its data built under tmp_path."""
    out, data = tmp_path / "out", tmp_path / "knn_demo"
    cmd = [sys.executable, "-m", "evaluation.linear", "experiment=linear_demo", f"output_dir={out}",
           f"data.root={data}", f"encoder.checkpoint={tmp_path / 'absent.safetensors'}"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the linear-probe demo did not finish in 600 s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(out / "results.json")
    assert results["demo"] is True and results["encoder"]["random_weights"] is True
    assert set(results["grid"]) == {"head_lr16", "head_lr64"} and results["n_train"] == 96
    assert results["best"]["top1"] >= 80, results["grid"]
    assert "<- reported" in proc.stdout
