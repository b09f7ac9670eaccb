"""k-NN: weighted votes on features with known neighbours, chunking, small sets, the app."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from app_helpers import make_folder, run_knn_app

import pixio
from evaluation.knn import global_features, image_folders, knn_classify, knn_evaluate


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
    """The protocol written plainly, one test image at a time."""
    train = train / train.norm(dim=1, keepdim=True)
    hits1 = hits5 = 0
    for x, y in zip(test / test.norm(dim=1, keepdim=True), truth, strict=True):
        sims = train @ x
        order = sims.argsort(descending=True)[:k]
        votes = [0.0] * num_classes
        for i in order.tolist():
            votes[int(labels[i])] += math.exp(float(sims[i]) / t)
        ranked = np.argsort(-np.asarray(votes), kind="stable")
        hits1 += int(ranked[0] == int(y))
        hits5 += int(int(y) in ranked[:5].tolist() and votes[int(y)] > 0)
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
    assert record["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    train_set, val_set = image_folders(data, 32, 32)
    with torch.no_grad():
        feats = [global_features(encoder, torch.stack([s[0] for s in d])) for d in (train_set, val_set)]  # fmt: skip
    saved = torch.load(one_process_run / "features.pt")
    torch.testing.assert_close(saved["train"], feats[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(saved["val"], feats[1], rtol=0, atol=1e-5)
    assert saved["classes"] == ["blue", "green", "red"]
    expected = knn_evaluate(feats[0], torch.tensor(train_set.targets), feats[1], torch.tensor(val_set.targets), [1, 3, 50], 0.07, 3)  # fmt: skip
    for k, (top1, top5) in expected.items():
        assert record["top1"][str(k)] == pytest.approx(top1)
        assert record["top5"][str(k)] == pytest.approx(top5)
    assert "top-1" in (tmp / "out" / "train.log").read_text()


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
            return compose("eval_knn", [f"data.root={tmp_path}", f"output_dir={tmp_path}", *overrides])  # fmt: skip

    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=f"^encoder.checkpoint: not found: {missing}$"):
        validate_knn(config(f"encoder.checkpoint={missing}"))
    with pytest.raises(ConfigError, match="^encoder.checkpoint: is required"):
        validate_knn(config())
    missing.write_bytes(b"")
    with pytest.raises(ConfigError, match="^knn.k: must be a non-empty list"):
        validate_knn(config(f"encoder.checkpoint={missing}", "knn.k=[10,0]"))
    with pytest.raises(ConfigError, match=r"^data.root: .*train is not a directory"):
        validate_knn(config(f"encoder.checkpoint={missing}"))
