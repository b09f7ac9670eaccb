"""`train.init_from` (a fresh run starts from a full MAE file, a resume ignores it) and the
online k-NN monitor (`monitor.*`: the k-NN app's maths on a fixed subset, shared by the ranks)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from tests_helpers import CPU_OVERRIDES, free_port, start_ranks

import pixio
from pixio.checkpoint import save_mae
from pixio.convert import convert
from pixio.data.demo import demo_jpeg
from pixio.knn import global_features, knn_evaluate
from pixio.monitor import KnnMonitor, MonitorConfig, decode, plan
from pixio.runtime.config import ConfigError, to_container
from pixio.runtime.distributed import DistInfo
from pixio.runtime.prefetch import normalize_images
from pixio.runtime.trainer import Trainer
from pretraining.config import build_model, check_init_from
from pretraining.task import MAETask
from pretraining.train import initial_weights

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
REPO = Path(__file__).resolve().parents[2]
SHORT = ("train.epochs=1", "train.iters_per_epoch=2", "train.save_every_iters=2")


def _trainer(cfg, init_from=None, monitor=None) -> Trainer:
    torch.manual_seed(0)
    task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim, cfg.model.name, init_from)
    task.monitor(monitor, cfg.monitor.every)
    batches = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]  # fmt: skip
    return Trainer(cfg, task, batches, SINGLE, to_container(cfg))


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- train.init_from ----------------------------------------------------------------------------
@pytest.fixture
def full_file(cpu_config, tmp_path) -> Path:
    """A tiny pre-training run's final checkpoint, converted to one full file."""
    source = _trainer(cpu_config(*SHORT, f"output_dir={tmp_path / 'source'}"))
    source.fit()
    return convert(None, tmp_path / "source" / "checkpoint-last", tmp_path / "mae.safetensors", full=True)  # fmt: skip


def test_a_fresh_run_starts_from_the_file_and_a_resume_ignores_it(cpu_config, full_file, tmp_path, caplog):  # fmt: skip
    cfg = cpu_config(*SHORT, f"train.init_from={full_file}")
    check_init_from(cfg)
    assert initial_weights(cfg, 0) == str(full_file)  # a fresh run
    fresh = _trainer(cfg, initial_weights(cfg, 0))
    start = fresh.full_state()
    assert _same(start, pixio.hub.load_mae(full_file).state_dict())  # weights, not the step
    assert not _same(start, _trainer(cpu_config(*SHORT, "output_dir=" + str(tmp_path / "x"))).full_state())  # fmt: skip
    assert fresh.progress.iteration == 0 and not fresh.optimizers["mae"].optimizer.state
    fresh.fit()
    trained = fresh.full_state()

    other = tmp_path / "other.safetensors"  # same sizes, other weights
    torch.manual_seed(1)
    save_mae(build_model(cfg), other)
    again = cpu_config("train.epochs=1", "train.iters_per_epoch=2", f"train.init_from={other}")
    with caplog.at_level(logging.INFO, logger="pixio.pretrain"):
        assert initial_weights(again, 0) is None
    assert f"train.init_from={other} ignored: the run resumes from its own checkpoint" in caplog.text  # fmt: skip
    resumed = _trainer(again, init_from=str(other))  # even if handed over, the trainer skips it
    assert resumed.resume() and _same(resumed.full_state(), trained)


def test_init_from_is_checked_at_load_in_one_line(cpu_config, full_file, tmp_path):
    with pytest.raises(ConfigError, match="^train.init_from: not found: /nowhere.safetensors$"):
        check_init_from(cpu_config("train.init_from=/nowhere.safetensors"))
    encoder = pixio.save_encoder(pixio.load_encoder(full_file), tmp_path / "enc.safetensors")
    with pytest.raises(ConfigError, match="^train.init_from: .*enc.safetensors holds an encoder only"):  # fmt: skip
        check_init_from(cpu_config(f"train.init_from={encoder}"))
    with pytest.raises(ConfigError, match=r"the model built has decoder_depth 2 \(file: 1\)$"):
        check_init_from(cpu_config(f"train.init_from={full_file}", "model.decoder_depth=2"))
    plain = tmp_path / "mae.pth"  # records nothing: the shapes are checked when it is loaded
    torch.save(pixio.hub.load_mae(full_file).state_dict(), plain)
    deeper = cpu_config(*SHORT, f"train.init_from={plain}", "model.depth=3")
    check_init_from(deeper)
    with pytest.raises(ConfigError, match=r"^train.init_from: .*mae.pth does not fit the model: the model has depth 3 \(file: 2\)$"):  # fmt: skip
        _trainer(deeper, str(plain))


# ---- the online k-NN monitor --------------------------------------------------------------------
def _monitor_cfg(root: Path, **kw):
    fields = dict(knn_root=str(root), build_demo=True, train_images=30, val_images=14, k=5, batch_size=4, every=2)  # fmt: skip
    return OmegaConf.structured(MonitorConfig(**{**fields, **kw}))


def _direct(cfg, mae) -> tuple[float, float]:
    """The k-NN app's computation (pixio.knn) on the same subset, in one pass, by hand."""
    subsets = plan(cfg)
    feats = {}
    with torch.no_grad():
        for split in ("train", "val"):
            images = torch.stack([decode(s, 64) for s in subsets[split]])
            feats[split] = global_features(mae.eval(), normalize_images(images))
    labels = {s: torch.tensor([x.label for x in subsets[s]]) for s in feats}
    result = knn_evaluate(feats["train"], labels["train"], feats["val"], labels["val"], [cfg.k], cfg.temperature, subsets["num_classes"])  # fmt: skip
    return result[cfg.k]


def test_monitor_matches_the_knn_app_maths(tmp_path, tiny_mae):
    cfg = _monitor_cfg(tmp_path / "knn")
    mae = pixio.build_mae("pixio_vitt16", depth=2, img_size=64, decoder_depth=1).eval()
    with torch.no_grad():
        row = KnnMonitor(cfg, 64, SINGLE)(mae)
    top1, top5 = _direct(cfg, mae)
    assert row == {"monitor/knn_top1": pytest.approx(top1), "monitor/knn_top5": pytest.approx(top5)}  # fmt: skip
    assert 0 < top5 <= 100 and top1 <= top5
    assert [s.label for s in plan(cfg)["val"]].count(0) >= 1  # a seeded subset over the classes


def _rank_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    from pixio.runtime.distributed import cleanup, init_distributed
    from pixio.runtime.parallel import fully_shard_model

    info = init_distributed()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mae = pixio.build_mae("pixio_vitt16", depth=2, img_size=64, decoder_depth=1).eval()
    monitor = KnnMonitor(_monitor_cfg(Path(root), batch_size=3), 64, info)
    with torch.no_grad():
        row = monitor(mae)
        sharded = fully_shard_model(mae, [*mae.blocks, *mae.decoder_blocks], None)
        torch.save([row, monitor(sharded)], f"{out}.{rank}")  # FSDP2: `features` gathers too
    cleanup()


def test_two_ranks_share_the_work_and_agree_with_one(tmp_path):
    """2 gloo ranks (odd shares, padded batches), plain and FSDP2-sharded, give one process's
    result."""

    port = free_port()
    root, out = tmp_path / "knn", str(tmp_path / "row")
    # a rank's error is raised here; hung ranks are killed after the timeout
    start_ranks(_rank_worker, (2, port, str(root), out), nprocs=2, timeout=300)
    (plain0, fsdp0), (plain1, fsdp1) = (
        torch.load(f"{out}.{r}", weights_only=True) for r in range(2)
    )
    torch.manual_seed(0)
    mae = pixio.build_mae("pixio_vitt16", depth=2, img_size=64, decoder_depth=1).eval()
    with torch.no_grad():
        one = KnnMonitor(_monitor_cfg(root), 64, SINGLE)(mae)  # 30 / 2: odd shares, padded
    assert plain0 == plain1 == fsdp0 == fsdp1 and plain0 == pytest.approx(one)


def _labelled_tar(path: Path, start: int, labels: list[int | None]) -> None:
    with wds.TarWriter(str(path)) as tar:
        for i, label in enumerate(labels):
            sample = {"__key__": f"{start + i:06d}", "jpg": demo_jpeg(start + i)}
            if label is not None:
                sample["cls"] = str(label).encode()
            tar.write(sample)


def test_shards_with_cls_labels_and_unreadable_images(tmp_path, caplog):
    root = tmp_path / "shards"
    for split, start in (("train", 0), ("val", 100)):
        (root / split).mkdir(parents=True)
        _labelled_tar(root / split / "a.tar", start, [0, 1, None, 2, 0, 1])  # one unlabelled
    with wds.TarWriter(str(root / "val" / "b.tar")) as tar:
        tar.write({"__key__": "bad", "jpg": b"\xff\xd8 not a JPEG", "cls": b"2"})
    cfg = _monitor_cfg(root, build_demo=False, train_images=100, val_images=100)
    subsets = plan(cfg)
    assert [s.label for s in subsets["train"]] == [0, 1, 2, 0, 1] and subsets["num_classes"] == 3
    assert len(subsets["val"]) == 6
    first = subsets["train"][0]
    expected = pixio.data.images.load_rgb(demo_jpeg(0))  # the member's bytes, read at its offset
    assert np.array_equal(np.asarray(pixio.data.images.load_rgb(first.read())), np.asarray(expected))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pixio.monitor"):
        monitor = KnnMonitor(cfg, 64, SINGLE)
    assert "k-NN monitor: 1 unreadable images skipped (first: " in caplog.text and "b.tar@" in caplog.text  # fmt: skip
    assert int((monitor.val_labels >= 0).sum()) == 5
    mae = pixio.build_mae("pixio_vitt16", depth=2, img_size=64, decoder_depth=1).eval()
    with torch.no_grad():
        row = monitor(mae)
    assert set(row) == {"monitor/knn_top1", "monitor/knn_top5"}  # out of the 5 readable
    assert all(round(v * 5 / 100, 6).is_integer() for v in row.values())


def _train_shards(root: Path) -> Path:
    root.mkdir()
    with wds.TarWriter(str(root / "00000.tar")) as tar:
        for i in range(24):
            tar.write({"__key__": f"{i:06d}", "jpeg": demo_jpeg(i)})
    return root


def test_pretraining_logs_the_monitor_to_metrics(tmp_path):
    out = tmp_path / "run"
    args = [
        *CPU_OVERRIDES, f"data.root={_train_shards(tmp_path / 'shards')}", "data.kind=web",
        "data.shuffle_buffer=8", "train.epochs=1", f"output_dir={out}", "monitor=demo",
        f"monitor.knn_root={tmp_path / 'knn'}", "monitor.every=2", "monitor.train_images=24",
        "monitor.val_images=12", "monitor.k=5",
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "pretraining.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "monitor/knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4]
    assert all(0 <= r["monitor/knn_top1"] <= r["monitor/knn_top5"] <= 100 for r in knn)
    assert "k-NN monitor: 24 train / 12 val images" in proc.stdout + proc.stderr
    assert pixio.load_encoder(out / "encoder.safetensors").depth == 2  # the export's record
