"""Every reader of a training checkpoint directory verifies the files it uses against the
manifest first: `pixio.load_encoder` / `read_state_dict`, `python -m pixio.convert`,
`broadcast_encoder_state` (evaluation's encoder, once on rank 0 of two), `load_checkpoint`,
`read_meta`. Damage (64 KB of zeros inside a tensor, zeros over a record header) is refused in
one line naming the directory and the file; torch's advice to load with weights_only off never
reaches the user; `checkpoint_digest` identifies the saved tensors, not the bookkeeping."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from integrity_helpers import (
    assert_refusal,
    record,
    resign,
    training_checkpoint,
    zero_bytes,
    zero_inside_tensor,
    zero_record_header,
)
from tests_helpers import TINY, free_port, run_main, start_ranks

import pixio
from pixio.checkpoint import DamagedCheckpointError, broadcast_encoder_state, checkpoint_digest
from pixio.convert import convert
from pixio.convert import main as convert_main
from pixio.runtime import checkpoint_dir
from pixio.runtime.checkpointing import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    read_meta,
)
from pixio.safe_load import load_dcp_entries, safe_torch_load

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

FQN = "model.mae.patch_embed.proj.weight"  # 196 KB of tensor bytes in the tiny MAE
DAMAGE = {"tensor bytes": zero_inside_tensor, "record header": zero_record_header}


def _mae(seed: int) -> pixio.PixioMAE:
    torch.manual_seed(seed)
    return pixio.build_mae("pixio_vitt16", **TINY, decoder_embed_dim=32, decoder_depth=1,
                           decoder_num_heads=4)  # fmt: skip


@pytest.fixture(scope="module")
def intact_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("intact") / "run"
    training_checkpoint(out, {"mae": _mae(3)}, step=3)
    training_checkpoint(out, {"mae": _mae(5)}, step=5)
    return out


@pytest.fixture
def run(intact_run, tmp_path) -> Path:
    """A pre-training run's folder with checkpoints at steps 3 and 5 (checkpoint-last: 5), a
    copy for each test to damage."""
    return Path(shutil.copytree(intact_run, tmp_path / "run", symlinks=True))


def _saved(checkpoint: Path) -> torch.Tensor:
    """The patch embedding as saved (before any damage): what a reader must return."""
    return load_dcp_entries(checkpoint, [FQN])[FQN]


def _meta_encoder() -> pixio.PixioEncoder:
    with torch.device("meta"):  # what evaluation and the teacher build: the read fills it
        encoder = pixio.build_encoder("pixio_vitt16", **TINY)
    return encoder.to_empty(device="cpu")


# ---- the damage loads silently without the check -------------------------------------------
def test_zeros_inside_a_tensor_load_silently_without_the_manifest_check(run):
    newest = run / "checkpoint-00000005"
    saved = load_dcp_entries(newest, [FQN])[FQN]
    zero_inside_tensor(newest, FQN)
    damaged = load_dcp_entries(newest, [FQN])[FQN]  # the unverified DCP read
    zeroed = (damaged == 0) & (saved != 0)
    assert 0 < zeroed.sum() <= (64 << 10) // 4  # some weights silently became zero
    assert torch.equal(damaged[~zeroed], saved[~zeroed])


# ---- each reader refuses it --------------------------------------------------------------------
@pytest.mark.parametrize("damage", DAMAGE)
def test_load_encoder_refuses_a_damaged_checkpoint(run, damage):
    file = DAMAGE[damage](run / "checkpoint-00000005", FQN)
    for path in (run / "checkpoint-last", run / "checkpoint-00000005"):
        with pytest.raises(DamagedCheckpointError) as info:
            pixio.load_encoder("pixio_vitt16", path, **TINY)
        message = str(info.value)
        assert_refusal(message, path, file.name)
        assert f"{file.name} does not match its checksum" in message
        assert f"the next older checkpoint is {run / 'checkpoint-00000003'}" in message
        assert ("(= checkpoint-00000005)" in message) == path.is_symlink()
        with pytest.raises(DamagedCheckpointError):
            pixio.read_state_dict(path)
    older = run / "checkpoint-00000003"
    encoder = pixio.load_encoder("pixio_vitt16", older, **TINY)
    assert torch.equal(encoder.patch_embed.proj.weight, _saved(older))


def test_the_only_checkpoint_damaged_says_there_is_no_older_one(tmp_path):
    final = training_checkpoint(tmp_path / "run", {"mae": _mae(0)})
    zero_inside_tensor(final, FQN)
    with pytest.raises(ValueError, match="there is no older checkpoint next to it") as info:
        pixio.load_encoder("pixio_vitt16", final, **TINY)
    assert_refusal(str(info.value), final, "__0_0.distcp")


def test_an_encoder_read_hashes_only_the_files_holding_its_tensors(run, monkeypatch):
    newest = run / "checkpoint-00000005"
    saved = _saved(newest)
    zero_bytes(newest / "meta.pt", 100, 64)  # not read by an encoder reader: not hashed
    hashed = []
    real = checkpoint_dir.file_digest
    monkeypatch.setattr(checkpoint_dir, "file_digest", lambda p: hashed.append(p.name) or real(p))
    encoder = pixio.load_encoder("pixio_vitt16", newest, **TINY)
    assert torch.equal(encoder.patch_embed.proj.weight, saved)
    assert sorted(hashed) == [".metadata", "__0_0.distcp"]  # each once
    with pytest.raises(CheckpointError) as info:  # the meta reader uses meta.pt: refused
        read_meta(newest)
    assert_refusal(str(info.value), newest, "meta.pt")


def test_missing_manifest_and_unlisted_file_are_refused(run):
    newest = run / "checkpoint-00000005"
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["files"]["__0_0.distcp"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpointError, match="__0_0.distcp is not listed in manifest"):
        pixio.load_encoder("pixio_vitt16", newest, **TINY)
    (newest / "manifest.json").unlink()
    with pytest.raises(DamagedCheckpointError, match="is damaged: manifest.json is missing"):
        pixio.load_encoder("pixio_vitt16", newest, **TINY)


def test_load_checkpoint_verifies_what_it_reads(run):
    newest = run / "checkpoint-00000005"
    zero_inside_tensor(newest, "optimizer.mae.state.patch_embed.proj.weight.exp_avg")
    with pytest.raises(DamagedCheckpointError) as info:
        load_checkpoint(newest, ("optimizer",))
    assert_refusal(str(info.value), newest, "__0_0.distcp")


def test_convert_cli_refuses_a_damaged_checkpoint_and_writes_nothing(run, tmp_path):
    final = run / "checkpoint-last"
    zero_inside_tensor(final, FQN)
    dst = tmp_path / "encoder.safetensors"
    overrides = [f"--override={k}={v}" for k, v in TINY.items()]
    argv = ["--model", "pixio_vitt16", "--input", str(final), "--output", str(dst), *overrides]
    res = run_main(convert_main, argv)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), res.stderr
    assert_refusal(lines[0], final, "__0_0.distcp")
    assert not dst.exists()
    zero_record_header(final, "model.mae.blocks.0.attn.qkv.weight")  # the function, too
    for out in (dst, tmp_path / "hf_folder"):
        with pytest.raises(DamagedCheckpointError):
            convert("pixio_vitt16", final, out, **TINY)
        assert not out.exists()


@pytest.mark.parametrize("damage", DAMAGE)
def test_broadcast_encoder_state_refuses_a_damaged_checkpoint(run, damage):
    """Evaluation's `encoder.checkpoint` and the distillation teacher load through this."""
    final = run / "checkpoint-last"
    DAMAGE[damage](final, FQN)
    with pytest.raises(ValueError) as info:
        broadcast_encoder_state(_meta_encoder(), final)
    assert_refusal(str(info.value), final, "__0_0.distcp")


def test_evaluation_encoder_refuses_a_damaged_checkpoint(run):
    from omegaconf import OmegaConf

    from evaluation.features import EncoderConfig, load_frozen_encoder
    from pixio.runtime.config import ConfigError

    final = run / "checkpoint-last"
    cfg = OmegaConf.structured(EncoderConfig(name="pixio_vitt16", checkpoint=str(final), **TINY))
    encoder = load_frozen_encoder(cfg)  # intact: the run's newest MAE encoder
    assert torch.equal(encoder.patch_embed.proj.weight, _saved(final))
    zero_inside_tensor(final, FQN)
    with pytest.raises(ConfigError) as info:
        load_frozen_encoder(cfg)
    assert str(info.value).startswith("encoder.checkpoint: checkpoint ")
    assert_refusal(str(info.value), final, "__0_0.distcp")


# ---- two ranks: rank 0 verifies and reads, rank 1 receives -------------------------------------
def _broadcast_worker(rank: int, port: int, paths: list[str], result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    from pixio.runtime.distributed import cleanup, init_distributed

    init_distributed(device="cpu")
    real, reads = checkpoint_dir.file_digest, []
    for path in paths:
        hashed: list[str] = []
        checkpoint_dir.file_digest = lambda p, hashed=hashed: hashed.append(p.name) or real(p)
        encoder, error = _meta_encoder(), None
        try:
            broadcast_encoder_state(encoder, path)
        except ValueError as err:
            error = str(err)
        weight = encoder.patch_embed.proj.weight.tolist() if error is None else None
        reads.append({"hashed": hashed, "error": error, "weight": weight})
    Path(f"{result}.{rank}").write_text(json.dumps(reads))
    cleanup()


def test_two_ranks_verify_once_on_the_reading_rank(run, tmp_path):
    intact, damaged = run / "checkpoint-00000003", run / "checkpoint-last"
    zero_inside_tensor(damaged, FQN)
    result = str(tmp_path / "rank")
    paths = [str(intact), str(damaged)]
    # a rank's error is raised here; hung ranks are killed after the timeout
    start_ranks(_broadcast_worker, (free_port(), paths, result), nprocs=2, timeout=300)
    (good0, bad0), (good1, bad1) = (json.loads(Path(f"{result}.{r}").read_text()) for r in (0, 1))
    assert good0["error"] is good1["error"] is None
    assert good0["weight"] == good1["weight"] == _saved(intact).tolist()
    assert sorted(good0["hashed"]) == [".metadata", "__0_0.distcp"] and good1["hashed"] == []
    assert bad0["error"] == bad1["error"]  # the same line on every rank
    assert_refusal(bad1["error"], damaged, "__0_0.distcp")
    assert bad1["hashed"] == []


# ---- torch's advice never reaches the user -----------------------------------------------------
def test_header_damage_the_manifest_cannot_see_gives_no_weights_only_advice(run, caplog):
    """Zeros over a record header of a checkpoint whose manifest was rewritten to match (the
    file written damaged): torch's refusal advises weights_only=False; none of ours does."""
    newest = run / "checkpoint-00000005"
    zero_record_header(newest, FQN)
    resign(newest)
    messages = []
    for read in (
        lambda: pixio.load_encoder("pixio_vitt16", newest, **TINY),
        lambda: load_checkpoint(newest),
        lambda: load_dcp_entries(newest, [FQN]),
        lambda: broadcast_encoder_state(_meta_encoder(), newest),
    ):
        with pytest.raises((ValueError, CheckpointError)) as info:
            read()
        messages.append(str(info.value))
    model = _mae(0)
    state = {"model": {"mae": model.state_dict()}}
    with caplog.at_level(logging.WARNING, logger="pixio.checkpoint"):
        CheckpointManager(run).load_latest(state)  # falls back to step 3, saying why
    messages += [r.getMessage() for r in caplog.records if r.name.startswith("pixio")]
    for message in messages:
        assert "weights_only" not in message and "add_safe_globals" not in message, message
        assert str(newest) in message, message
    assert "damaged or holds pickled code (Unsupported operand 0)" in messages[0]
    loaded = state["model"]["mae"]["patch_embed.proj.weight"]
    assert torch.equal(loaded, _saved(run / "checkpoint-00000003"))


def test_damaged_pth_header_gives_no_weights_only_advice(tiny_encoder, tmp_path):
    path = tmp_path / "encoder.pth"
    torch.save(tiny_encoder.state_dict(), path)
    zero_bytes(path, 0, 64)
    with pytest.raises(ValueError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path}: it is damaged or holds pickled code")
    assert "weights_only" not in message
    truncated = tmp_path / "truncated.pth"  # the zip reader's error names the file too
    torch.save(tiny_encoder.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(ValueError, match=f"cannot read {truncated}: PytorchStreamReader"):
        pixio.load_encoder("pixio_vitt16", truncated, **TINY)


# ---- checkpoint_digest: the weights, not the bookkeeping ---------------------------------------
def _save_weights(out: Path, step: int, weight: torch.Tensor) -> Path:
    state = {"model": {"mae": {"w": weight.clone()}}, "optimizer": {}}
    return CheckpointManager(out).save(step, state, {"iteration": step, "note": str(out)})


def test_checkpoint_digest_identifies_the_weights(tmp_path):
    weight = torch.arange(12.0).reshape(3, 4)
    a = _save_weights(tmp_path / "a", 3, weight)
    b = _save_weights(tmp_path / "b", 7, weight)  # other step, meta.pt, .metadata (tmp path)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["world_size"] = 8  # bookkeeping only; and another layout of the same entries
    files = dict(reversed(list(manifest["files"].items())))
    (b / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=4))
    assert (a / "manifest.json").read_bytes() != (b / "manifest.json").read_bytes()
    assert checkpoint_digest(a) == checkpoint_digest(b) == checkpoint_digest(tmp_path / "a" / "checkpoint-last")  # fmt: skip
    changed = weight.clone()
    changed[1, 2] += 1
    c = _save_weights(tmp_path / "c", 3, changed)
    assert checkpoint_digest(c) != checkpoint_digest(a)
    # The data file's sha256 as the manifest lists it is what is identified.
    file, offset, length = record(a, "model.mae.w")
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["files"][file.name]["sha256"] = "0" * 64
    (a / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint_digest(a) != checkpoint_digest(b)
