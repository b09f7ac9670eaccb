"""DCP checkpoints are read without running pickled code: the restricted `.metadata`
unpickler, weights_only non-tensor entries, data files confined to the checkpoint."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from pixio import safe_load
from pixio.runtime import checkpointing as ckpt

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def saved(tmp_path: Path, steps=(1,)) -> Path:
    manager = ckpt.CheckpointManager(tmp_path)
    for step in steps:
        state = {"model": {"w": torch.full((4, 4), float(step))}, "count": step}
        manager.save(step, state, {"iteration": step})
    return tmp_path / ckpt.numbered_name(steps[-1])


def plant(checkpoint: Path, payload: object) -> Path:
    """Replace `.metadata` with `payload` and re-sign the manifest, as an attacker would."""
    md = checkpoint / ".metadata"
    md.write_bytes(pickle.dumps(payload, protocol=2))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][".metadata"] = ckpt.file_digest(md)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return md


def test_real_metadata_passes_the_restricted_unpickler(tmp_path: Path) -> None:
    md = safe_load.read_dcp_metadata(saved(tmp_path))
    assert isinstance(md, Metadata)
    assert md.state_dict_metadata["model.w"].size == torch.Size([4, 4])


@pytest.mark.parametrize("nested", [False, True])
def test_planted_metadata_payload_is_refused_not_run(tmp_path: Path, nested: bool) -> None:
    marker = tmp_path / "code-ran"
    payload = RunsCode(marker)
    if nested:  # hidden inside otherwise genuine metadata
        payload = Metadata(state_dict_metadata={"model.w": payload})  # type: ignore[dict-item]
    file = plant(saved(tmp_path / "run"), payload)
    with pytest.raises(safe_load.UnsafeCheckpointError) as info:
        safe_load.read_dcp_metadata(file.parent)
    message = str(info.value)
    assert f"refusing to load {file}" in message and "io.open is not one of" in message
    assert "weights_only" not in message  # no advice to turn checks off
    assert not marker.exists()
    pickle.loads(file.read_bytes())  # the payload is live: plain unpickling runs it
    assert marker.exists()


def test_manager_falls_back_past_a_planted_payload(tmp_path: Path, caplog) -> None:
    marker = tmp_path / "code-ran"
    newest = saved(tmp_path / "run", steps=(1, 2))
    file = plant(newest, RunsCode(marker))
    state = {"model": {"w": torch.zeros(4, 4)}, "count": 0}
    with caplog.at_level(logging.WARNING, logger="pixio.checkpoint"):
        path, meta = ckpt.CheckpointManager(tmp_path / "run").load_latest(state)
    assert meta["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(4, 4))
    assert f"refusing to load {file}" in caplog.text and "checkpoint-00000001" in caplog.text
    assert not marker.exists()


def test_planted_payload_in_a_non_tensor_entry_is_refused(tmp_path: Path) -> None:
    """DCP stores non-tensor values as pickles and torch's planner loads them with
    weights_only=False; ours does not."""
    marker, path = tmp_path / "code-ran", tmp_path / "ckpt"
    dcp.save({"w": torch.ones(2), "evil": RunsCode(marker)}, checkpoint_id=path)
    assert not marker.exists()
    with pytest.raises(
        safe_load.UnsafeCheckpointError, match=r"refusing to load .*ckpt \(entry evil\)"
    ):
        safe_load.load_dcp_entries(path, ["w", "evil"])
    assert not marker.exists()
    assert torch.equal(safe_load.load_dcp_entries(path, ["w"])["w"], torch.ones(2))
    dcp.load({"w": torch.zeros(2), "evil": None}, checkpoint_id=path)  # torch's own reader
    assert marker.exists()


def test_data_file_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path)
    with open(checkpoint / ".metadata", "rb") as f:
        md = pickle.load(f)
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(ValueError, match="outside the checkpoint"):
        safe_load.read_dcp_metadata(checkpoint)


def test_damaged_metadata_is_a_clear_error(tmp_path: Path) -> None:
    checkpoint = saved(tmp_path)
    data = (checkpoint / ".metadata").read_bytes()
    (checkpoint / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*\.metadata: damaged DCP metadata"):
        safe_load.read_dcp_metadata(checkpoint)
