"""The depth app end to end on CPU (tiny encoder, KITTI-layout demo data): a two-epoch run writes
results.json with every validation, the best and the final ones; a killed run resumes to the
same weights and results; two gloo processes count every validation image exactly once."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from app_helpers import (
    N_VAL,
    compose_eval,
    cpu_overrides,
    read_json,
    save_tiny_encoder,
    small_demo,
)
from tests_helpers import free_port, start_ranks

from evaluation.datasets import build_dataset
from evaluation.depth import main
from evaluation.head_job import build_task, run_eval
from pixio.runtime import checkpointing
from pixio.runtime.distributed import DistInfo
from pixio.runtime.validation import add_real

pytestmark = pytest.mark.slow
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("depth_app")
    return save_tiny_encoder(base / "encoder.safetensors"), small_demo("kitti", base / "kitti")


def head_state(out) -> dict[str, torch.Tensor]:
    ckpt = checkpointing.load_checkpoint(out / "checkpoint-last", ("model",))
    return ckpt["model"]["head"]


def test_two_epoch_dpt_run_writes_results_with_best_and_final(inputs, tmp_path):
    checkpoint, root = inputs
    out = tmp_path / "run"
    # Batches of 4: 2 iterations per epoch (the DPT head's optimiser step is the slow part on CPU).
    overrides = cpu_overrides(checkpoint, root, out, **{"dataset": "kitti", "train.batch_size": 4})
    main(compose_eval("depth", overrides))
    results = read_json(out / "results.json")
    assert (results["task"], results["dataset"], results["head"]) == ("depth", "kitti", "dpt")
    epochs = results["epochs"]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0]
    assert all(e["samples"] == N_VAL and e["images"] == N_VAL for e in epochs)
    best = max(epochs, key=lambda e: e["d1"])
    assert results["best"]["label"] == "best over epochs" and results["best"]["d1"] == best["d1"]
    assert results["best"]["epoch"] == best["epoch"]
    assert results["final"]["label"] == "final epoch"
    assert results["final"]["rmse"] == epochs[-1]["rmse"] and results["final"]["epoch"] == 2.0
    assert 0 <= results["final"]["d1"] <= 100 and results["final"]["rmse"] > 0
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert results["encoder"] == {"source": "pixio", "name": "pixio_vitt16", "sha256": sha,
                                  "checkpoint": str(checkpoint), "module": None,
                                  "random_weights": False}  # fmt: skip
    assert results["config"]["encoder"]["sha256"] == sha  # hashed once, at the start
    # The sizes asked for (64 / 64 / 42), not the reference's, and so labelled.
    assert results["protocol"] == {"patch_size": 16, "crop_size": 64, "window": 64, "stride": 42,
                                   "reference": {"crop_size": 256, "window": 256, "stride": 170},
                                   "as_reference": False,
                                   "tta": {"mode": "none", "reference": "none"}}  # fmt: skip
    assert (
        results["architecture"]["n_cls_tokens"] == 8
        and results["architecture"]["source"] == "pixio"
    )
    assert results["config"]["optim"]["schedule"] == "poly"
    # Only the head is trained and saved; the pictures of the first validation images exist.
    assert set(checkpointing.load_checkpoint(out / "checkpoint-last", ("model",))["model"]) == {
        "head"
    }
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["val_0.png", "val_1.png"]


def test_killed_run_resumes_to_the_uninterrupted_result(inputs, tmp_path):
    checkpoint, root = inputs
    extra = {"dataset": "kitti", "head": "linear", "train.save_every_iters": 3}
    full, part = tmp_path / "full", tmp_path / "part"
    main(compose_eval("depth", cpu_overrides(checkpoint, root, full, **extra)))
    # Stopped mid-epoch 2 (4 iterations per epoch), after the first validation.
    main(compose_eval("depth", cpu_overrides(checkpoint, root, part, **extra, **{"train.max_iters": 6})))  # fmt: skip
    assert not (part / "results.json").exists()
    main(compose_eval("depth", cpu_overrides(checkpoint, root, part, **extra)))
    a, b = head_state(full), head_state(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_json(full / "results.json"), read_json(part / "results.json")
    for key in ("best", "final", "epochs"):
        assert ra[key] == rb[key], key


def test_a_resume_refuses_another_encoder_file_and_follows_a_moved_one(inputs, tmp_path, capsys):  # fmt: skip
    checkpoint, root = inputs
    extra = {"dataset": "kitti", "head": "linear", "train.save_every_iters": 1}
    out = tmp_path / "run"
    main(compose_eval("depth", cpu_overrides(checkpoint, root, out, **extra, **{"train.max_iters": 1})))  # fmt: skip
    other = save_tiny_encoder(tmp_path / "other.safetensors", seed=1)  # same shapes, new weights
    with pytest.raises(SystemExit) as stop:
        main(compose_eval("depth", cpu_overrides(other, root, out, **extra)))
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"config error: encoder.checkpoint: {out / 'checkpoint-00000001'} was trained with "
        f"{checkpoint} (sha256 {sha[:16]}); this run has {other} (sha256 {other_sha[:16]}). A "
        "resume cannot change the weights the run was built on: set it back, or use a new output_dir"
    )  # fmt: skip
    moved = tmp_path / "moved" / "encoder.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(checkpoint.read_bytes())
    main(compose_eval("depth", cpu_overrides(moved, root, out, **extra, **{"train.max_iters": 2})))  # fmt: skip
    assert head_state(out) is not None and checkpointing.numbered_checkpoints(out)[-1][0] == 2


def _worker(rank: int, world: int, port: int, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    run_eval(compose_eval("depth", overrides), "depth")


def test_two_process_validation_counts_every_image_once(inputs, tmp_path):
    checkpoint, root = inputs
    out = tmp_path / "two"
    overrides = cpu_overrides(checkpoint, root, out, **{"dataset": "kitti", "head": "linear",
                              "train.batch_size": 1, "train.epochs": 1})  # fmt: skip
    start_ranks(_worker, (2, free_port(), overrides), nprocs=2)
    final = read_json(out / "results.json")["final"]
    # 3 images over 2 ranks: one padded repeat, which must not count.
    assert final["samples"] == N_VAL and final["images"] == N_VAL
    # The reduced metrics equal those of the final head over the whole set in one process.
    cfg = compose_eval("depth", overrides)
    task = build_task(cfg, "depth", CPU)
    task.head.load_state_dict(head_state(out))
    modules = {"encoder": task.features, "head": task.head.eval()}
    val = build_dataset("kitti", root, "val")
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(len(val)):
            item = {k: torch.as_tensor(v)[None] for k, v in val[i].items()}
            batch = task.to_device(item, CPU.device)  # uint8 images normalised, as in training
            add_real(totals, task.validate(modules, batch), torch.tensor([True]))
    totals["samples"] = torch.tensor(float(len(val)), dtype=torch.float64)
    expected = task.summarize(totals)
    for key in ("d1", "abs_rel", "rmse", "silog"):
        assert final[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
