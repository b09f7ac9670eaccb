"""k-NN: weighted votes on features with known neighbours, chunking, small sets, the app."""

from __future__ import annotations

import errno
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import knn_config, make_folder, run_knn_app
from PIL import Image
from tests_helpers import free_port, start_ranks
from torch.nn import functional as F

import pixio
from evaluation.knn import global_features, knn_classify, knn_evaluate
from evaluation.knn_job import image_folders
from pixio.runtime.prefetch import normalize_images


def unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def three_neighbours() -> tuple[torch.Tensor, ...]:
    """Test point at 0 deg; train: class 0 at 0 deg (sim 1), class 1 at +-25.84 deg (sim 0.9)."""
    train = torch.tensor([unit(0), unit(25.84), unit(-25.84), unit(180)])
    labels = torch.tensor([0, 1, 1, 2])
    return train, labels, torch.tensor([unit(0)]), torch.tensor([0])


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    train, labels, test, test_labels = three_neighbours()
    # T = 0.07: e^(1/.07) = 1.6e6 beats 2 e^(.9/.07) = 7.7e5; T = 1: e^1 = 2.7 loses to 2 e^.9 = 4.9
    assert knn_classify(train, labels, test, test_labels, 3, 0.07, 3) == (100.0, 100.0)
    assert knn_classify(train, labels, test, test_labels, 3, 1.0, 3) == (0.0, 100.0)
    # k = 1: the single nearest neighbour decides whatever T
    assert knn_classify(train, labels, test, torch.tensor([1]), 1, 1.0, 3)[0] == 0.0
    # top-5 counts only classes that got a vote: with k = 1 it is top-1
    assert knn_classify(train, labels, test, torch.tensor([2]), 1, 0.07, 3) == (0.0, 0.0)


def test_known_accuracy_normalisation_and_small_sets():
    train, labels, _, _ = three_neighbours()
    test = torch.tensor([unit(2), unit(24), unit(179), unit(-30), unit(90)])
    truth = torch.tensor([0, 1, 2, 1, 0])  # the last one is nearest to class 1: wrong
    top1, top5 = knn_classify(train, labels, test, truth, 1, 0.07, 3)
    assert top1 == top5 == pytest.approx(80.0)  # k = 1: one voted class
    assert knn_classify(train, labels, test, truth, 4, 0.07, 3)[1] == 100.0
    scaled = knn_classify(train * 7, labels, test * 0.1, truth, 1, 0.07, 3)
    assert scaled == (top1, top5)  # features are L2-normalised inside


def brute_force(train, labels, test, truth, k, t, num_classes) -> tuple[float, float]:
    """The protocol written plainly in float64, one test image at a time. Each class's score is
    log(sum of exp(sim / T)) over its neighbours, taken as m + log(sum exp(sim / T - m)) with m
    the class's largest sim / T: exp(1 / 0.001) overflows even float64."""
    train, test = train.double(), test.double()
    train = train / train.norm(dim=1, keepdim=True)
    hits1 = hits5 = 0
    for x, y in zip(test / test.norm(dim=1, keepdim=True), truth, strict=True):
        sims = train @ x
        by_class: dict[int, list[float]] = {}
        for i in sims.argsort(descending=True)[:k].tolist():
            by_class.setdefault(int(labels[i]), []).append(float(sims[i]) / t)
        scores = [-math.inf] * num_classes
        for c, logits in by_class.items():
            m = max(logits)
            scores[c] = m + math.log(math.fsum(math.exp(v - m) for v in logits))
        ranked = np.argsort(-np.asarray(scores), kind="stable")
        hits1 += int(ranked[0] == int(y))
        hits5 += int(int(y) in ranked[:5].tolist() and scores[int(y)] > -math.inf)
    return hits1 * 100 / len(test), hits5 * 100 / len(test)


def test_matches_brute_force_and_is_chunking_invariant():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(200, 16, generator=g), torch.randn(37, 16, generator=g)
    labels, truth = torch.randint(0, 10, (200,), generator=g), torch.randint(0, 10, (37,), generator=g)  # fmt: skip
    results = {c: knn_evaluate(train, labels, test, truth, [1, 5, 20], 0.07, 10, chunk_size=c) for c in (1, 5, 1000)}  # fmt: skip
    assert results[1] == results[5] == results[1000]
    for k in (1, 5, 20):
        assert results[1][k] == pytest.approx(brute_force(train, labels, test, truth, k, 0.07, 10))
        assert knn_classify(train, labels, test, truth, k, 0.07, 10) == results[1][k]


def clustered(seed: int = 0, n_classes: int = 10, d: int = 32) -> tuple[torch.Tensor, ...]:
    """Unit features of 10 classes around nearby centres: similarities 0.72-0.97, so sim / T
    passes float32's exp limit (88.7) for T = 0.01 and far beyond it for T = 0.001."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(d, generator=g), dim=0)
    centres = F.normalize(base + 0.2 * torch.randn(n_classes, d, generator=g) / math.sqrt(d), dim=1)  # fmt: skip

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        noise = 0.3 * torch.randn(len(labels), d, generator=g) / math.sqrt(d)
        return F.normalize(centres[labels] + noise, dim=1), labels

    return (*draw(20), *draw(10))


@pytest.mark.parametrize("temperature", [0.07, 0.01, 0.001])
def test_votes_are_exact_at_any_temperature(temperature):
    train, labels, test, truth = clustered()
    assert (test @ train.T).max() / 0.01 > 88.8  # exp overflows float32 at T = 0.01 here
    results = knn_evaluate(train, labels, test, truth, [1, 5, 20], temperature, 10, chunk_size=7)
    for k in (1, 5, 20):
        assert results[k] == pytest.approx(brute_force(train, labels, test, truth, k, temperature, 10))  # fmt: skip
    # A smaller T weights the nearest neighbour more: at 0.001 k=20 is k=1 for top-1.
    if temperature == 0.001:
        assert results[20][0] == results[1][0]


def test_k_larger_than_the_training_set_is_clamped():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    labels, truth = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2])
    assert knn_classify(train, labels, test, truth, 200, 0.07, 3) == knn_classify(train, labels, test, truth, 6, 0.07, 3)  # fmt: skip
    with pytest.raises(ValueError, match="positive"):
        knn_evaluate(train, labels, test, truth, [0], 0.07, 3)


# ---- the app, end to end ----------------------------------------------------------------------
TINY_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)


@pytest.fixture(scope="module")
def knn_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knn")
    torch.manual_seed(0)
    encoder = pixio.build_encoder("pixio_vitt16", **TINY_ENCODER).eval()
    ckpt = pixio.save_encoder(encoder, tmp / "enc.safetensors")
    data = make_folder(tmp / "data", {"train": 5, "val": 3})  # 15 train, 9 val: odd per rank
    args = [
        "encoder.name=pixio_vitt16", f"encoder.checkpoint={ckpt}", "encoder.embed_dim=32",
        "encoder.depth=2", "encoder.num_heads=2", "encoder.img_size=32", f"data.root={data}",
        "data.resize=32", "data.crop=32", "data.num_workers=0", "knn.k=[1,3,50]",
        "train.batch_size=4", "train.device=cpu", "train.precision=fp32", "logger=none",
        "knn.save_features=true",
    ]  # fmt: skip
    return tmp, encoder, ckpt, data, args


@pytest.fixture(scope="module")
def one_process_run(knn_setup) -> Path:
    tmp, _, _, _, args = knn_setup
    proc = run_knn_app(*args, f"output_dir={tmp / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


@pytest.mark.slow
def test_knn_app_end_to_end_matches_in_process_features(knn_setup, one_process_run):
    tmp, encoder, ckpt, data, args = knn_setup
    record = json.loads((tmp / "out" / "results.json").read_text())
    assert set(record["top1"]) == {"1", "3", "50"} and record["n_train"] == 15
    assert record["n_val"] == 9 and record["num_classes"] == 3 and not record["random_weights"]
    assert record["encoder"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["encoder"]["checkpoint"] == str(ckpt.resolve()) and record["demo"] is False
    train_set, val_set = image_folders(data, 32, 32)
    with torch.no_grad():
        feats = [global_features(encoder, normalize_images(torch.stack([s[0] for s in d]))) for d in (train_set, val_set)]  # fmt: skip
    saved = torch.load(one_process_run / "features.pt")
    torch.testing.assert_close(saved["train"], feats[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(saved["val"], feats[1], rtol=0, atol=1e-5)
    assert saved["classes"] == ["blue", "green", "red"]
    expected = knn_evaluate(feats[0], torch.tensor(train_set.targets), feats[1], torch.tensor(val_set.targets), [1, 3, 50], 0.07, 3)  # fmt: skip
    for k, (top1, top5) in expected.items():
        assert record["top1"][str(k)] == pytest.approx(top1)
        assert record["top5"][str(k)] == pytest.approx(top5)
    assert "top-1" in (tmp / "out" / "train.log").read_text()


def test_uint8_crops_normalised_on_the_device_equal_the_float_path(tmp_path):
    """The workers' uint8 crops, normalised where the encoder runs, give the images, features and
    accuracies of the former float path (ToTensor + Normalize in the workers)."""
    from torchvision import transforms

    from evaluation.knn_job import extract_features
    from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
    from pixio.runtime.distributed import DistInfo

    data = make_folder(tmp_path / "data", {"train": 4, "val": 2})
    float_path = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    train, val = image_folders(data, 32, 32)
    assert train[0][0].dtype == torch.uint8 and train[0][0].shape == (3, 32, 32)
    torch.manual_seed(0)
    encoder = pixio.build_encoder("pixio_vitt16", **TINY_ENCODER).eval()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    feats, reference = [], []
    for dataset in (train, val):
        floats = torch.stack([float_path(train.loader(path)) for path, _ in dataset.samples])
        assert (normalize_images(torch.stack([x for x, _ in dataset])) - floats).abs().max() <= 1e-6
        feats.append(extract_features(encoder, dataset, 5, info))
        with torch.no_grad():
            reference.append(global_features(encoder, floats))
        torch.testing.assert_close(feats[-1], reference[-1], rtol=0, atol=1e-6)
    labels = [torch.tensor(d.targets) for d in (train, val)]
    ks = [1, 3, 12]
    assert knn_evaluate(feats[0], labels[0], feats[1], labels[1], ks, 0.07, 3) == knn_evaluate(reference[0], labels[0], reference[1], labels[1], ks, 0.07, 3)  # fmt: skip


@pytest.mark.slow
def test_knn_app_two_processes_give_the_one_process_results(knn_setup, one_process_run):
    tmp, _, _, _, args = knn_setup
    two = run_knn_app(*args, f"output_dir={tmp / 'two'}", "launcher.gpus=2", timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    # 15 train / 9 val images on 2 ranks: padded positions must drop out, order must hold
    a, b = (json.loads((d / "results.json").read_text()) for d in (one_process_run, tmp / "two"))
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"] and b["n_val"] == 9
    fa, fb = (torch.load(d / "features.pt") for d in (one_process_run, tmp / "two"))
    for key in ("train", "val"):  # same rows in the same order (batches differ: 1e-6)
        torch.testing.assert_close(fb[key], fa[key], rtol=0, atol=1e-5)


def test_knn_config_errors_name_the_key(tmp_path):
    from hydra import compose, initialize_config_dir

    from evaluation.knn import CONFIG_DIR, validate_knn
    from pixio.runtime.config import ConfigError

    def config(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            return compose("eval_knn", [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path}", *overrides])  # fmt: skip

    missing = tmp_path / "nope.pth"
    # Values and paths first, then the encoder (whose checks may read the checkpoint with torch).
    with pytest.raises(ConfigError, match=r"^data.root: .*train is not a directory"):
        validate_knn(config(f"encoder.checkpoint={missing}"))
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"^encoder.checkpoint: not found: {missing}$"):
        validate_knn(config(f"encoder.checkpoint={missing}"))
    with pytest.raises(ConfigError, match="^encoder.checkpoint: is required"):
        validate_knn(config())
    missing.write_bytes(b"")
    with pytest.raises(ConfigError, match="^knn.k: must be a non-empty list"):
        validate_knn(config(f"encoder.checkpoint={missing}", "knn.k=[10,0]"))


# ---- bad input and failures ---------------------------------------------------------------------
def knn_results(name: str = "pixio_vith16", sha256: str | None = "ab" * 32) -> dict:
    """A finished k-NN's results.json of an earlier version (the encoder's name, its source,
    module and digest beside it), which the apps and the report still read."""
    return {"task": "knn", "top1": {"10": 50.0}, "top5": {"10": 80.0}, "encoder": name,
            "encoder_source": "pixio", "encoder_module": None, "checkpoint_sha256": sha256,
            "random_weights": sha256 is None}  # fmt: skip


def test_random_weights_are_refused_outside_the_demos(tmp_path):
    from evaluation.knn import validate_knn
    from pixio.runtime.config import ConfigError

    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    missing = tmp_path / "typo.pth"
    with pytest.raises(ConfigError, match=rf"^encoder.checkpoint: not found: {missing} \(random weights, encoder.random_if_missing, are for the demo experiments only"):  # fmt: skip
        validate_knn(knn_config(tmp_path, f"encoder.checkpoint={missing}", "encoder.random_if_missing=true"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"^encoder.checkpoint: is null \(random weights"):
        validate_knn(knn_config(tmp_path, "encoder.random_if_missing=true"))
    validate_knn(knn_config(tmp_path, "experiment=knn_demo", f"encoder.checkpoint={missing}", f"data.root={tmp_path / 'data'}"))  # fmt: skip


def test_an_output_dir_holding_other_results_is_refused(tmp_path, caplog):
    from app_helpers import fake_run

    from evaluation.knn import validate_knn
    from evaluation.knn_job import start_checks
    from pixio.runtime.config import ConfigError

    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    ckpt = tmp_path / "enc.pth"
    ckpt.write_bytes(b"weights one")
    sha = hashlib.sha256(b"weights one").hexdigest()
    out, cfg = tmp_path / "out", knn_config(tmp_path, f"encoder.checkpoint={ckpt}")
    fake_run(out, "depth", "nyuv2", "dpt", [90.0])  # a depth run's results.json
    with pytest.raises(ConfigError, match=rf"^output_dir: {out} holds the results of another run \(results.json: depth nyuv2 dpt of pixio_vith16 \(sha256 abababababababab\)\); this run \(k-NN of pixio_vith16\) would replace them"):  # fmt: skip
        validate_knn(cfg)
    (out / "results.json").unlink()
    with pytest.raises(ConfigError, match=rf"^output_dir: {out} holds the validation results of a depth / segmentation run \(val_results.json\)"):  # fmt: skip
        validate_knn(cfg)
    (out / "val_results.json").unlink()
    (out / "results.json").write_text(json.dumps(knn_results("pixio_vitl16")))
    with pytest.raises(ConfigError, match=r"holds the results of another run \(results.json: k-NN of pixio_vitl16 \(sha256 abab"):  # fmt: skip
        validate_knn(cfg)
    (out / "results.json").write_text(json.dumps(knn_results())[:40])  # cut short
    with pytest.raises(ConfigError, match=rf"^output_dir: {out / 'results.json'}: not valid JSON, cut short\?"):  # fmt: skip
        validate_knn(cfg)
    # The same encoder: validation passes; at the start the checkpoint's digest decides.
    (out / "results.json").write_text(json.dumps(knn_results(sha256=sha)))
    validate_knn(cfg)
    caplog.set_level("INFO", logger="pixio.knn")
    assert start_checks(cfg) == sha
    assert "holds the results of an earlier k-NN of this encoder: this run replaces them" in caplog.text  # fmt: skip
    ckpt.write_bytes(b"weights two")  # same path, another file
    with pytest.raises(ConfigError, match=rf"\(results.json: k-NN of pixio_vith16 \(sha256 {sha[:16]}\)\); this run \(k-NN of pixio_vith16 \(sha256 {hashlib.sha256(b'weights two').hexdigest()[:16]}\)\)"):  # fmt: skip
        start_checks(cfg)


def truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut in half (the header reads; decoding fails)."""
    pixels = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_stops_extraction_with_one_line_naming_it(tmp_path, workers):
    from evaluation.knn_job import extract_features
    from pixio.runtime.distributed import DistInfo
    from pixio.runtime.job import DataError

    data = make_folder(tmp_path / "data", {"train": 2, "val": 2})
    bad = [truncated_jpeg(data / "val" / "red" / "bad.jpg"), truncated_jpeg(data / "val" / "blue" / "bad.jpg")]  # fmt: skip
    encoder = pixio.build_encoder("pixio_vitt16", **TINY_ENCODER).eval()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train, val = image_folders(data, 32, 32)
    assert extract_features(encoder, train, 4, info, workers).shape == (6, 32)
    with pytest.raises(DataError) as err:
        extract_features(encoder, val, 4, info, workers)
    message = str(err.value)
    assert message.startswith(f"cannot read image {bad[1]}: image file is truncated")
    assert "(and 1 more, each in train.log); replace or remove it" in message
    assert "\n" not in message


def _two_ranks(rank: int, port: int, out: Path) -> None:
    """What each of two gloo ranks gets from rank 0's start-up work and from a bad image that
    only rank 1 met, one line per step in out/rank<r>.txt."""
    import os

    from evaluation.knn_job import raise_unreadable
    from pixio.runtime.config import ConfigError
    from pixio.runtime.distributed import init_distributed
    from pixio.runtime.rank0 import rank0_result

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    info = init_distributed(device="cpu")
    seen = [rank0_result(lambda: f"computed by rank {rank}")]

    def refuse() -> str:
        raise ConfigError("output_dir: refused on rank 0")

    for step in (lambda: rank0_result(refuse), lambda: raise_unreadable(["cannot read image b.jpg: x"] if rank else [], info)):  # fmt: skip
        try:
            step()
        except Exception as err:
            seen.append(f"{type(err).__name__}: {err}")
    (out / f"rank{rank}.txt").write_text("\n".join(seen))


def test_two_ranks_share_rank0_work_and_every_unreadable_image(tmp_path):
    start_ranks(_two_ranks, args=(free_port(), tmp_path), nprocs=2)
    ranks = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert ranks[0] == ranks[1]  # rank 0 read nothing bad, yet stops with rank 1
    computed, refused, unreadable = ranks[0]
    assert computed == "computed by rank 0" and refused == "ConfigError: output_dir: refused on rank 0"  # fmt: skip
    assert unreadable.startswith("DataError: cannot read image b.jpg: x; replace or remove it")


@pytest.mark.slow
def test_knn_app_names_a_truncated_jpeg_in_one_line(knn_setup, tmp_path):
    *_, args = knn_setup
    data = make_folder(tmp_path / "data", {"train": 2, "val": 1})
    bad = truncated_jpeg(data / "val" / "green" / "cut.jpg")
    run = run_knn_app(*args, f"data.root={data}", "data.num_workers=1", f"output_dir={tmp_path / 'out'}")  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"error: cannot read image {bad}: image file is truncated" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out" / "results.json").exists()


def test_a_full_disk_at_features_pt_keeps_a_complete_results_json(knn_setup, tmp_path, monkeypatch, capsys):  # fmt: skip
    from evaluation.knn import main
    from evaluation.results import read_results

    tmp, *_, args = knn_setup
    out = tmp_path / "out"

    def disk_full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")  # what a write cut by ENOSPC leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        main(knn_config(tmp, *args, f"output_dir={out}"))
    record = read_results(out / "results.json")  # complete: every field the report reads
    assert set(record["top1"]) == {"1", "3", "50"} and record["n_val"] == 9
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: cannot write {out / 'features.pt'}: No space left on device; results.json beside it is complete"
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if "features" in p.name) == []  # no partial file


def test_knn_results_json_has_the_head_runs_schema(tmp_path):
    # One schema for every task: task, dataset, demo, head, metric, labelled best / final rows
    # holding the metric, the same encoder record, protocol, architecture, config.
    from app_helpers import fake_run

    from evaluation.knn_job import results_record
    from evaluation.results import read_results, run_identity

    ckpt = tmp_path / "enc.safetensors"
    ckpt.write_bytes(b"weights")
    cfg = knn_config(tmp_path, f"encoder.checkpoint={ckpt}", "knn.k=[20,5,200]")
    results = {5: (60.0, 80.0), 20: (70.0, 90.0), 200: (65.0, 95.0)}
    extra = {"protocol": {"resize": 256, "crop": 256}, "architecture": {"patch_size": 16}}
    record = results_record(cfg, results, "cd" * 32, extra)
    fake_run(tmp_path / "depth", "depth", "nyuv2", "dpt", [80.0])
    head = json.loads((tmp_path / "depth" / "results.json").read_text())
    shared = {"task", "dataset", "demo", "head", "metric", "best", "final", "encoder", "config"}
    assert shared <= set(head) and shared | set(extra) <= set(record)
    assert set(record["encoder"]) == set(head["encoder"])
    assert (record["task"], record["dataset"], record["demo"], record["head"]) == ("knn", "imagenet", False, None)  # fmt: skip
    assert record["metric"] == "top1"
    assert record["best"] == {"label": "best over k", "k": 20, "top1": 70.0, "top5": 90.0}
    assert record["final"] == {"label": "largest k", "k": 200, "top1": 65.0, "top5": 95.0}
    assert [row["k"] for row in record["by_k"]] == [5, 20, 200]
    assert record["encoder"] == {"source": "pixio", "name": "pixio_vith16",
                                 "checkpoint": str(ckpt.resolve()), "module": None,
                                 "sha256": "cd" * 32, "random_weights": False}  # fmt: skip
    (tmp_path / "knn").mkdir()
    (tmp_path / "knn" / "results.json").write_text(json.dumps(record))
    checked = read_results(tmp_path / "knn" / "results.json")
    assert run_identity(checked) == {"task": "knn", "dataset": None, "head": None,
                                     "source": "pixio", "name": "pixio_vith16", "module": None,
                                     "sha256": "cd" * 32}  # fmt: skip
    assert run_identity(knn_results(sha256="cd" * 32)) == run_identity(checked)  # older files
    demo = results_record(knn_config(tmp_path, "experiment=knn_demo"), results, None, extra)
    assert demo["demo"] is True and demo["random_weights"] is True
    assert demo["encoder"]["random_weights"] and demo["encoder"]["checkpoint"] is None
