"""What a run reports (`eval.select`): with `holdout` the validation split is never read before
the head and epoch are chosen on held-out training images, then read once, with the kept weights
of the choice (also after a resume); `last` and `reference` pick the rows their rules name; the
holdout is a seeded, disjoint share of the training pairs."""

from __future__ import annotations

import pytest
import torch
from app_helpers import (  # fmt: skip
    N_TRAIN,
    N_VAL,
    compose_eval,
    cpu_overrides,
    fake_history,
    read_json,
    save_tiny_encoder,
    small_demo,
)

import evaluation.head_job as head_job
from evaluation.common import validate_eval
from evaluation.datasets import DepthDataset, build_dataset
from evaluation.depth import main
from evaluation.grid import metric_key
from evaluation.head_job import build_task, write_results
from evaluation.selection import holdout_indices, selection_path
from pixio.runtime.config import ConfigError
from pixio.runtime.distributed import DistInfo
from pixio.runtime.threads import cpu_threads
from pixio.runtime.validation import add_real

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# 8 pairs, a quarter held out: 6 to train on (3 iterations of 2 per epoch), 2 to choose on.
HOLDOUT = {"dataset": "kitti", "head": "linear", "eval.vis_images": 0, "eval.select": "holdout",
           "eval.holdout_fraction": 0.25, "head.lrs": "[1e-3,1e-2]", "train.epochs": 3}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("selection")
    return save_tiny_encoder(base / "encoder.safetensors"), small_demo("kitti", base / "kitti")


@pytest.mark.slow
def test_holdout_reads_the_validation_split_once_after_the_choice(inputs, tmp_path, monkeypatch):
    checkpoint, root = inputs
    val_images = {str(p[0]) for p in build_dataset("kitti", root, "val").pairs}
    events: list[tuple[str, ...]] = []
    read, choose = DepthDataset.__getitem__, head_job.holdout_choice

    def recorded_read(self, index):  # the val split's images; training crops; held-out images
        image = str(self.pairs[index][0])
        events.append(("val" if image in val_images else "train" if self.split == "train" else "holdout", image))  # fmt: skip
        return read(self, index)

    def recorded_choice(*args, **kwargs):
        events.append(("choice",))
        return choose(*args, **kwargs)

    monkeypatch.setattr(DepthDataset, "__getitem__", recorded_read)
    monkeypatch.setattr(head_job, "holdout_choice", recorded_choice)
    out = tmp_path / "run"
    cfg = compose_eval("depth", cpu_overrides(checkpoint, root, out, **HOLDOUT))
    main(cfg)
    chosen_at = events.index(("choice",))
    assert all(e[0] != "val" for e in events[:chosen_at])  # nothing of the split before the choice
    assert [e[0] for e in events[chosen_at + 1 :]] == ["val"] * N_VAL  # then every image, once
    trained = {e[1] for e in events if e[0] == "train"}
    held = [e[1] for e in events if e[0] == "holdout"]  # full images, once per validation
    assert len(trained) == N_TRAIN - 2 and len(set(held)) == 2 and len(held) == 3 * 2
    assert not trained & set(held)  # never trained on what chooses
    results = read_json(out / "results.json")
    assert results["select"]["rule"] == "holdout" and results["select"]["epochs_split"] == "holdout"
    best, head = results["best"], results["reported_head"]
    assert best["split"] == "val" and best["samples"] == N_VAL
    holdout_best = results["grid"][head]["best"]  # the choice: its epoch, on the holdout
    assert (best["epoch"], best["iteration"]) == (holdout_best["epoch"], holdout_best["iteration"])  # fmt: skip
    assert all(e["samples"] == 2 for e in results["epochs"])  # the holdout's 2 images
    assert results["final"]["split"] == "holdout"
    # Only the chosen weights remain; validating the split with them by hand gives the numbers.
    kept = selection_path(out, head, best["iteration"])
    assert sorted((out / "selection").iterdir()) == [kept]
    task = build_task(cfg, "depth", CPU)
    task.grid_module(head).load_state_dict(torch.load(kept, weights_only=True)["state"])
    task.active = [head]
    assert by_hand(task, root) == {k: best[k] for k in ("d1", "abs_rel", "rmse", "images")}
    assert results["per_depth_bin"]["split"] == "val" and results["per_depth_bin"]["head"] == head
    assert sum(r["pixels"] for r in results["per_depth_bin"]["rows"]) > 0


def by_hand(task, root) -> dict[str, float]:
    """The task's metrics over the whole kitti val split, one image at a time."""
    val = build_dataset("kitti", root, "val")
    modules = {"encoder": task.features, **{h.name: h.module.eval() for h in task.grid}}
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad(), cpu_threads():  # the job's count (train.cpu_threads=auto): bit-equal sums
        for i in range(len(val)):
            item = {k: torch.as_tensor(v)[None] for k, v in val[i].items()}
            add_real(totals, task.validate(modules, task.to_device(item, CPU.device)), torch.tensor([True]))  # fmt: skip
    totals["samples"] = torch.tensor(float(len(val)), dtype=torch.float64)
    m = task.summarize(totals)
    return {k: m[k] for k in ("d1", "abs_rel", "rmse", "images")}


@pytest.mark.slow
def test_a_holdout_run_stopped_and_resumed_reports_what_an_uninterrupted_one_does(inputs, tmp_path):  # fmt: skip
    checkpoint, root = inputs
    extra = {**HOLDOUT, "train.save_every_iters": 2}
    full, part = tmp_path / "full", tmp_path / "part"
    main(compose_eval("depth", cpu_overrides(checkpoint, root, full, **extra)))
    # Stopped in epoch 2 (after the first validation kept its heads), then resumed.
    main(compose_eval("depth", cpu_overrides(checkpoint, root, part, **extra, **{"train.max_iters": 4})))  # fmt: skip
    assert not (part / "results.json").exists() and list((part / "selection").iterdir())
    main(compose_eval("depth", cpu_overrides(checkpoint, root, part, **extra)))
    a, b = read_json(full / "results.json"), read_json(part / "results.json")
    for key in ("best", "final", "epochs", "grid", "reported_head", "per_depth_bin"):
        assert a[key] == b[key], key


def two_heads(a: float, b: float) -> dict[str, float]:
    return {"d1": max(a, b), metric_key("head_lr0.001", "d1"): a, metric_key("head_lr0.01", "d1"): b}  # fmt: skip


CONFIG = {"encoder": {"name": "pixio_vith16", "sha256": None}, "dataset": {"name": "nyuv2"},
          "head": {"name": "dpt", "lrs": [1e-3, 1e-2]}, "data": {}}  # fmt: skip


@pytest.mark.parametrize(
    "rule, head, epoch, label",
    [("reference", "head_lr0.001", 2.0, "best over epochs"),  # 50 at epoch 2: a tie, the first lr
     ("last", "head_lr0.01", 3.0, "last epoch")],  # last epoch: 30 against 40
)  # fmt: skip
def test_reference_and_last_report_the_rows_their_rules_name(tmp_path, rule, head, epoch, label):
    out = tmp_path / rule
    tables = {4: {"head_lr0.001": [{"bin": "a"}], "head_lr0.01": [{"bin": "b"}]}, 6: {"head_lr0.01": [{"bin": "c"}]}}  # fmt: skip
    fake_history(out, [two_heads(10, 20), two_heads(50, 50), two_heads(30, 40)], tables=tables)
    config = {**CONFIG, "eval": {"select": rule}}
    results = write_results(out, "depth", config, iters_per_epoch=2)
    assert results["reported_head"] == head and results["best"]["head"] == head
    assert (results["best"]["label"], results["best"]["epoch"]) == (label, epoch)
    assert results["final"]["epoch"] == 3.0 and results["final"]["d1"] == {"head_lr0.001": 30, "head_lr0.01": 40}[head]  # fmt: skip
    assert results["grid"]["head_lr0.01"]["best"]["epoch"] == 2.0  # its own best: 50 at epoch 2
    expected = {"reference": [{"bin": "a"}], "last": [{"bin": "c"}]}[rule]
    assert results["per_depth_bin"] == {"head": head, "split": "val", "epoch": epoch, "rows": expected}  # fmt: skip
    assert results["select"]["rule"] == rule and results["select"]["epochs_split"] == "val"


def test_the_holdout_is_a_seeded_disjoint_share_of_the_training_pairs(inputs, tmp_path):
    train, held = holdout_indices(40, 0.1, seed=0)
    assert len(held) == 4 and sorted(train + held) == list(range(40))
    assert (train, held) == holdout_indices(40, 0.1, seed=0) != holdout_indices(40, 0.1, seed=1)
    assert len(holdout_indices(3, 0.01, 0)[1]) == 1  # at least one image to choose on
    with pytest.raises(ValueError, match="leaves none to train on"):
        holdout_indices(1, 0.5, 0)
    checkpoint, root = inputs
    for key, value in (
        ("eval.holdout_fraction", 1.0),
        ("eval.select", "best"),
        ("eval.tta", "flips"),
    ):
        cfg = compose_eval("depth", cpu_overrides(checkpoint, root, tmp_path / "x", **{key: value}))
        with pytest.raises(ConfigError, match=f"^{key}: "):
            validate_eval(cfg, "depth")
