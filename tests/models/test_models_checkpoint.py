"""Checkpoint formats: reference .pth, training checkpoints, safetensors, HF folders, refusal."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
from tests_helpers import TINY, assert_same_weights

import pixio
from pixio.checkpoint import UnsafeCheckpointError


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
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pth"):
        pixio.load_encoder("pixio_vitt16", path, **TINY)
    assert not marker.exists()


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
