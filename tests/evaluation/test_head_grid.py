"""A grid of heads (`head.lrs`) on one encoder pass: the depth and segmentation apps (shrunk)
train four linear heads with one encoder forward per batch (counted), and each head's weights
and validations equal those of a single-lr run of the same seed, exactly (CPU); a DPT grid
likewise; results.json and the printed table hold every head and the reported one; a grid that
an 80 GB GPU cannot hold is refused in one line."""

from __future__ import annotations

import pytest
import torch
from app_helpers import compose_eval, cpu_overrides, read_json, save_tiny_encoder, small_demo

from evaluation.choices import head_name
from evaluation.common import validate_eval
from evaluation.datasets import get_info
from evaluation.depth import main as depth_main
from evaluation.features import FrozenFeatures
from evaluation.grid import metric_key
from evaluation.semseg import main as semseg_main
from evaluation.task import HeadTask
from pixio.runtime import checkpointing
from pixio.runtime.config import ConfigError

pytestmark = pytest.mark.slow
LRS = (1e-3, 2e-3, 5e-4, 1e-2)
# Two epochs of two iterations (8 pairs, batch 4), pictures off: the runs' cost is the point.
SHRUNK = {"head": "linear", "train.batch_size": 4, "eval.vis_images": 0}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("grid")
    encoder = save_tiny_encoder(base / "encoder.safetensors")
    return encoder, {"kitti": small_demo("kitti", base / "kitti"), "ade20k": small_demo("ade20k", base / "ade20k")}  # fmt: skip


@pytest.fixture
def encoder_calls(monkeypatch):
    """Encoder forwards counted by phase: `step` (training) and `validate`."""
    calls, phase = {"step": 0, "validate": 0}, ["?"]
    forward = FrozenFeatures.forward

    def counted(self, images):
        calls[phase[0]] += 1
        return forward(self, images)

    def in_phase(name):
        original = getattr(HeadTask, name)

        def run(self, *args, **kwargs):
            phase[0] = name
            return original(self, *args, **kwargs)

        return run

    monkeypatch.setattr(FrozenFeatures, "forward", counted)
    for name in ("step", "validate"):
        monkeypatch.setattr(HeadTask, name, in_phase(name))
    return calls


def run_app(app, inputs, out, **extra):
    checkpoint, roots = inputs
    dataset = "kitti" if app == "depth" else "ade20k"
    overrides = cpu_overrides(
        checkpoint, roots[dataset], out, dataset=dataset, **{**SHRUNK, **extra}
    )
    (depth_main if app == "depth" else semseg_main)(compose_eval(app, overrides))
    return read_json(out / "results.json")


def heads_of(out) -> dict[str, dict[str, torch.Tensor]]:
    return checkpointing.load_checkpoint(out / "checkpoint-last", ("model",))["model"]


@pytest.mark.parametrize("app, metric", [("depth", "d1"), ("semseg", "miou")])
def test_four_heads_train_on_one_encoder_pass_and_equal_single_lr_runs(app, metric, inputs, tmp_path, encoder_calls):  # fmt: skip
    grid = run_app(app, inputs, tmp_path / "grid", **{"head.lrs": f"[{','.join(map(str, LRS))}]"})
    grid_calls = dict(encoder_calls)
    assert grid_calls["step"] == 4  # one encoder forward per training batch, for all four heads
    grid_heads = heads_of(tmp_path / "grid")
    assert sorted(grid_heads) == sorted(head_name(lr) for lr in LRS)
    assert list(grid["grid"]) == [head_name(lr) for lr in LRS]  # in the order given
    for lr in LRS:
        for key in encoder_calls:
            encoder_calls[key] = 0
        single = run_app(app, inputs, tmp_path / f"lr{lr}", **{"optim.lr": lr})
        assert encoder_calls == grid_calls  # validation too: the windows once for every head
        name = head_name(lr)
        mine, theirs = grid_heads[name], heads_of(tmp_path / f"lr{lr}")["head"]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        entry = grid["grid"][name]
        assert entry["lr"] == lr and entry["module"] == name
        assert entry["epochs"] == single["epochs"]  # every metric of every epoch, exactly
        assert entry["best"] == {k: v for k, v in single["best"].items() if k != "label"}
        assert single["reported_head"] == name and single["grid"][name]["module"] == "head"
    # The reported head: the best of the heads' bests, its whole row; every epoch's best head.
    bests = {n: g["best"][metric] for n, g in grid["grid"].items()}
    assert grid["reported_head"] == max(bests, key=bests.get)
    assert grid["best"][metric] == max(bests.values()) and grid["best"]["head"] == grid["reported_head"]  # fmt: skip
    for row in grid["epochs"]:
        assert row[metric] == max(row[metric_key(head_name(lr), metric)] for lr in LRS)
    assert grid["select"]["rule"] == "reference" and "ties go to the first" in grid["select"]["head_rule"]  # fmt: skip
    table = grid["per_depth_bin" if app == "depth" else "per_class"]
    assert (table["head"], table["epoch"], table["split"]) == (grid["reported_head"], grid["best"]["epoch"], "val")  # fmt: skip
    if app == "semseg":  # the reported row's mIoU is the mean of its classes' IoUs
        assert table["rows"][0]["name"] == get_info("ade20k").class_names[0]
        ious = [r["iou"] for r in table["rows"] if r["iou"] is not None]
        assert sum(ious) / len(ious) == pytest.approx(grid["best"]["miou"])


def test_a_bins_depth_head_with_flip_tta_trains_and_is_recorded(inputs, tmp_path):
    values = {"head.depth_output": "bins", "eval.tta": "flip", "train.epochs": 1}
    results = run_app("depth", inputs, tmp_path / "bins", **values)
    head = heads_of(tmp_path / "bins")["head"]
    assert head["1.weight"].shape[0] == 256  # 256 bin logits
    assert results["protocol"]["tta"] == {"mode": "flip", "reference": "none"}
    assert results["config"]["head"]["depth_output"] == "bins" and 0 <= results["best"]["d1"] <= 100


def test_a_dpt_grid_equals_its_single_lr_run(inputs, tmp_path):
    extra = {"head": "dpt", "train.epochs": 1}
    grid = run_app("depth", inputs, tmp_path / "grid", **{**extra, "head.lrs": "[1e-3,1e-2]"})
    single = run_app("depth", inputs, tmp_path / "one", **{**extra, "optim.lr": 1e-2})
    mine, theirs = heads_of(tmp_path / "grid")["head_lr0.01"], heads_of(tmp_path / "one")["head"]
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert grid["grid"]["head_lr0.01"]["epochs"] == single["epochs"]


def test_a_grid_an_80_gb_gpu_cannot_hold_is_refused_naming_head_lrs(inputs, tmp_path):
    checkpoint, roots = inputs
    lrs = "[" + ",".join(f"{(i + 1) * 1e-4:g}" for i in range(400)) + "]"
    values = {"dataset": "ade20k", "head": "dpt", "train.device": "cuda", "head.lrs": lrs}
    cfg = compose_eval("semseg", cpu_overrides(checkpoint, roots["ade20k"], tmp_path / "run", **values))  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        validate_eval(cfg, "semseg")
    message = str(refused.value)
    assert message.startswith("head.lrs: 400 head(s) of ") and "\n" not in message
    fits = int(message.split("; ")[-1].split(" head(s) fit")[0])
    assert 0 < fits < 400
    cfg.head.lrs = [(i + 1) * 1e-4 for i in range(fits)]
    validate_eval(cfg, "semseg")  # as many as fit pass
