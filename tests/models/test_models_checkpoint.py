"""Checkpoint formats: reference .pth, training checkpoints (file and DCP directory),
safetensors, HF folders, refusal of pickled code, convert's path checks."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
from tests_helpers import TINY, assert_same_weights
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import pixio
from pixio.checkpoint import UnsafeCheckpointError
from pixio.convert import convert
from pixio.runtime.checkpointing import CheckpointManager
from pixio.safe_load import SafeDCPReader, read_dcp_metadata

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_reference_pth_roundtrip(tiny_encoder, tmp_path):
    path = tmp_path / "enc.pth"
    torch.save(tiny_encoder.state_dict(), path)
    loaded = pixio.load_encoder("pixio_vitt16", path, **TINY)
    assert_same_weights(loaded, tiny_encoder)


def test_safetensors_roundtrip(tiny_encoder, tmp_path):
    path = pixio.save_encoder(tiny_encoder, tmp_path / "enc.safetensors")
    assert_same_weights(pixio.load_encoder("pixio_vitt16", path, **TINY), tiny_encoder)


def test_pretraining_checkpoint_drops_decoder(tiny_mae, tmp_path):
    path = tmp_path / "checkpoint.pth"
    opt = torch.optim.AdamW(tiny_mae.parameters())
    torch.save({"model": tiny_mae.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                "scaler": {}, "args": {"model": "pixio_vitt16"}}, path)  # fmt: skip
    enc = pixio.load_encoder("pixio_vitt16", path, **TINY)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, tiny_mae.state_dict()[k])


def test_reference_mae_state_loads_strict(tiny_mae):
    other = pixio.build_mae("pixio_vitt16", **TINY, decoder_embed_dim=32, decoder_depth=2,
                            decoder_num_heads=4)  # fmt: skip
    other.load_state_dict(tiny_mae.state_dict(), strict=True)
    assert_same_weights(other, tiny_mae)


def test_distillation_student_drops_last_proj(tiny_encoder, tmp_path):
    sd = {f"module.{k}": v for k, v in tiny_encoder.state_dict().items()}
    sd["module.last_proj.0.weight"] = torch.randn(8, 64)
    torch.save({"model": sd, "epoch": 1}, tmp_path / "student.pth")
    enc = pixio.load_encoder("pixio_vitt16", tmp_path / "student.pth", **TINY)
    assert_same_weights(enc, tiny_encoder)


def test_missing_and_unexpected_keys_are_listed(tiny_encoder, tmp_path):
    sd = dict(tiny_encoder.state_dict())
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(
        KeyError, match=r"missing keys \['norm.weight'\].*unexpected keys \['extra.weight'\]"
    ):
        pixio.load_encoder("pixio_vitt16", tmp_path / "bad.pth", **TINY)


def test_missing_file_and_bad_extension(tiny_encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        pixio.load_encoder("pixio_vitt16", tmp_path / "nope.pth", **TINY)
    with pytest.raises(ValueError, match="unsupported encoder file extension '.bin'"):
        pixio.save_encoder(tiny_encoder, tmp_path / "enc.bin")


class _RunsCode:
    """Unpickling this would call os.system: a checkpoint carrying code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_is_refused_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"model": _RunsCode(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pth") as info:
        pixio.load_encoder("pixio_vitt16", path, **TINY)
    assert not marker.exists()
    message = str(info.value)
    assert "GLOBAL posix.system" in message  # the cause
    for advice in ("weights_only=False", "safe_globals", "trust"):  # never how to bypass it
        assert advice not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # nor in the chain


def test_convert_cli_to_safetensors_pth_and_hf(tiny_encoder, tmp_path):
    src = tmp_path / "enc.pth"
    torch.save({"model": tiny_encoder.state_dict()}, src)
    overrides = [f"--override={k}={v}" for k, v in TINY.items()]
    for dst in ["enc.safetensors", "enc2.pth", "hf"]:
        cmd = [sys.executable, "-m", "pixio.convert", "--model", "pixio_vitt16", "--input", str(src),
               "--output", str(tmp_path / dst), *overrides]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert f"wrote {tmp_path / dst}" in res.stdout
        assert_same_weights(
            pixio.load_encoder("pixio_vitt16", tmp_path / dst, **TINY), tiny_encoder
        )


def test_convert_cli_wrong_size_names_keys(tiny_encoder, tmp_path):
    src = tmp_path / "enc.pth"
    torch.save(tiny_encoder.state_dict(), src)
    cmd = [sys.executable, "-m", "pixio.convert", "--model", "pixio_vitt16", "--input", str(src),
           "--output", str(tmp_path / "o.pth"), "--override=depth=2", "--override=embed_dim=64",
           "--override=num_heads=4"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "unexpected keys ['blocks.2." in res.stderr


# ---- training checkpoint directories (torch.distributed.checkpoint) --------------------------
def _dcp_training_checkpoint(mae, out):
    """What the trainer saves: model + stepped AdamW state, written by CheckpointManager."""
    opt = torch.optim.AdamW(mae.parameters())
    for p in mae.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = {"model": get_model_state_dict(mae), "optimizer": get_optimizer_state_dict(mae, opt)}
    return CheckpointManager(out).save(5, state, {"iteration": 5})


def _assert_encoder_of(encoder, mae):
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, mae.state_dict()[k]), k


def test_dcp_checkpoint_dir_loads_encoder_without_reading_optimizer(
    tiny_mae, tmp_path, monkeypatch
):
    _dcp_training_checkpoint(tiny_mae, tmp_path / "run")
    last = tmp_path / "run" / "checkpoint-last"
    md = read_dcp_metadata(last)
    # Garble every optimiser byte in the data file: loading must not need them.
    data = last / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    for index, info in md.storage_data.items():
        if index.fqn.startswith("optimizer."):
            raw[info.offset : info.offset + info.length] = b"\xff" * info.length
    data.write_bytes(bytes(raw))
    read = []
    real_read = SafeDCPReader.read_data

    def spy(self, plan, planner):
        read.extend(item.storage_index.fqn for item in plan.items)
        return real_read(self, plan, planner)

    monkeypatch.setattr(SafeDCPReader, "read_data", spy)
    encoder = pixio.load_encoder("pixio_vitt16", last, **TINY)
    _assert_encoder_of(encoder, tiny_mae)
    assert read and all(fqn.startswith("model.") for fqn in read)


def test_convert_cli_from_checkpoint_dir(tiny_mae, tmp_path):
    final = _dcp_training_checkpoint(tiny_mae, tmp_path / "run")
    overrides = [f"--override={k}={v}" for k, v in TINY.items()]
    dst = tmp_path / "encoder.safetensors"
    cmd = [sys.executable, "-m", "pixio.convert", "--model", "pixio_vitt16", "--input", str(final),
           "--output", str(dst), *overrides]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    _assert_encoder_of(pixio.load_encoder("pixio_vitt16", dst, **TINY), tiny_mae)


@pytest.mark.parametrize("case", ["same file", "same file via symlink", "same dir", "inside dir"])
def test_convert_refuses_to_overwrite_its_input(tiny_mae, tiny_encoder, tmp_path, case):
    run = tmp_path / "run"
    final = _dcp_training_checkpoint(tiny_mae, run)
    pth = tmp_path / "enc.pth"
    torch.save(tiny_encoder.state_dict(), pth)
    (tmp_path / "link.pth").symlink_to(pth)
    src, dst = {
        "same file": (pth, pth),
        "same file via symlink": (tmp_path / "link.pth", pth),
        "same dir": (run / "checkpoint-last", final),
        "inside dir": (run / "checkpoint-last", final / "encoder.safetensors"),
    }[case]
    before = {p: p.read_bytes() for p in [pth, *final.iterdir()]}
    expected = "is the input" if case.startswith("same") else "inside the input checkpoint"
    with pytest.raises(ValueError, match=expected):
        convert("pixio_vitt16", src, dst, **TINY)
    if case == "inside dir":  # the CLI: one line, exit status 2
        cmd = [sys.executable, "-m", "pixio.convert", "--model", "pixio_vitt16", "--input",
               str(src), "--output", str(dst)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 2 and f"--output {dst} lies inside" in res.stderr
        assert "Traceback" not in res.stderr
    assert {p: p.read_bytes() for p in [pth, *final.iterdir()]} == before
