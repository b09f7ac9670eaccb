"""Checkpoint formats: reference .pth, training checkpoints (file and DCP directory, one
trained module of several), safetensors, HF folders, refusal of pickled code, convert's path
and module checks."""

import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from integrity_helpers import resign, training_checkpoint
from tests_helpers import TINY, assert_same_weights, run_main
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import pixio
from pixio.checkpoint import UnsafeCheckpointError, save_state_dict
from pixio.convert import convert
from pixio.convert import main as convert_main
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
        argv = ["--model", "pixio_vitt16", "--input", str(src), "--output", str(tmp_path / dst),
                *overrides]  # fmt: skip
        res = run_main(convert_main, argv)
        assert res.returncode == 0, res.stderr
        assert f"wrote {tmp_path / dst}" in res.stdout
        assert_same_weights(
            pixio.load_encoder("pixio_vitt16", tmp_path / dst, **TINY), tiny_encoder
        )


def test_convert_cli_wrong_size_names_sizes(tiny_encoder, tmp_path):
    """The real command line in its own process (the other convert tests call its main)."""
    src = tmp_path / "enc.pth"
    torch.save(tiny_encoder.state_dict(), src)
    cmd = [sys.executable, "-m", "pixio.convert", "--model", "pixio_vitt16", "--input", str(src),
           "--output", str(tmp_path / "o.pth"), "--override=depth=2", "--override=embed_dim=64",
           "--override=num_heads=4"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    # one line naming the differing size (the file's 3 blocks), not a list of keys
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "model has depth 2 (file: 3)" in res.stderr and "keys" not in res.stderr


# ---- training checkpoint directories (torch.distributed.checkpoint) --------------------------
def _assert_encoder_of(encoder, trained):
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k


def _garble_all_but(ckpt, prefix):
    """Overwrite the bytes of every tensor whose FQN lacks `prefix`: loading must not need them."""
    md = read_dcp_metadata(ckpt)
    data = ckpt / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    for index, info in md.storage_data.items():
        if not index.fqn.startswith(prefix):
            raw[info.offset : info.offset + info.length] = b"\xff" * info.length
    data.write_bytes(bytes(raw))
    resign(ckpt)  # the manifest then passes: what the read needs shows, not the verification


def _spy_reads(monkeypatch):
    """The FQNs SafeDCPReader reads from now on."""
    read = []
    real_read = SafeDCPReader.read_data

    def spy(self, plan, planner):
        read.extend(item.storage_index.fqn for item in plan.items)
        return real_read(self, plan, planner)

    monkeypatch.setattr(SafeDCPReader, "read_data", spy)
    return read


def _student(seed):
    """A distillation student: an encoder plus its `last_proj`."""
    torch.manual_seed(seed)
    student = pixio.build_encoder("pixio_vitt16", **TINY)
    student.last_proj = torch.nn.Sequential(torch.nn.Linear(64, 8))
    return student


def test_dcp_checkpoint_dir_loads_encoder_without_reading_optimizer(
    tiny_mae, tmp_path, monkeypatch
):
    training_checkpoint(tmp_path / "run", {"mae": tiny_mae})
    last = tmp_path / "run" / "checkpoint-last"
    _garble_all_but(last, "model.")
    read = _spy_reads(monkeypatch)
    encoder = pixio.load_encoder("pixio_vitt16", last, **TINY)
    _assert_encoder_of(encoder, tiny_mae)
    assert read and all(fqn.startswith("model.mae.") for fqn in read)
    # The decoder stays with read_state_dict (an MAE reads back whole); named or the only one.
    full = pixio.read_state_dict(last, module="mae")
    assert full.keys() == tiny_mae.state_dict().keys()
    assert full.keys() == pixio.read_state_dict(last).keys()


def test_dcp_two_modules_reads_only_the_chosen_one(tmp_path, monkeypatch):
    a, b = _student(1), _student(2)
    final = training_checkpoint(tmp_path / "run", {"student_a": a, "student_b": b})
    _garble_all_but(final, "model.student_b.")
    read = _spy_reads(monkeypatch)
    encoder = pixio.load_encoder("pixio_vitt16", final, module="student_b", **TINY)
    _assert_encoder_of(encoder, b)
    assert not torch.equal(encoder.patch_embed.proj.weight, a.patch_embed.proj.weight)
    assert read and all(fqn.startswith("model.student_b.") for fqn in read)
    assert any(fqn.startswith("model.student_b.last_proj.") for fqn in read)  # dropped after


def test_dcp_module_choice_errors_list_the_modules(tmp_path, monkeypatch):
    students = {"student_a": _student(1), "student_b": _student(2)}
    final = training_checkpoint(tmp_path / "run", students)
    read = _spy_reads(monkeypatch)
    several = rf"{re.escape(str(final))} holds 2 trained modules \('student_a', 'student_b'\)"
    with pytest.raises(ValueError, match=several + ": pass module=... to pick one"):
        pixio.load_encoder("pixio_vitt16", final, **TINY)
    unknown = r"has no trained module 'student_c'; it holds 'student_a', 'student_b'"
    with pytest.raises(ValueError, match=unknown):
        pixio.read_state_dict(final, module="student_c")
    assert read == []  # decided from the metadata alone


def test_dcp_flat_layout_of_earlier_versions_is_refused(tiny_mae, tmp_path):
    opt = torch.optim.AdamW(tiny_mae.parameters())
    state = {"model": get_model_state_dict(tiny_mae),
             "optimizer": get_optimizer_state_dict(tiny_mae, opt)}  # fmt: skip
    final = CheckpointManager(tmp_path / "run").save(5, state, {"iteration": 5})
    for module in (None, "mae"):
        with pytest.raises(ValueError, match="holds parameters, not named modules.*earlier"):
            pixio.load_encoder("pixio_vitt16", final, module=module, **TINY)


def test_pth_module_selection(tmp_path):
    a, b = _student(1), _student(2)
    both = tmp_path / "both.pth"
    torch.save({"student_a": a.state_dict(), "student_b": b.state_dict()}, both)
    _assert_encoder_of(pixio.load_encoder("pixio_vitt16", both, module="student_b", **TINY), b)
    with pytest.raises(ValueError, match="2 trained modules.*module="):
        pixio.load_encoder("pixio_vitt16", both, **TINY)
    nested = tmp_path / "nested.pth"  # the trainer layout saved as one file: the only module
    torch.save({"model": {"student_a": a.state_dict()}, "iteration": 5}, nested)
    _assert_encoder_of(pixio.load_encoder("pixio_vitt16", nested, **TINY), a)
    _assert_encoder_of(pixio.load_encoder("pixio_vitt16", nested, module="student_a", **TINY), a)
    with pytest.raises(ValueError, match="no trained module 'student_b'.*'student_a'"):
        pixio.load_encoder("pixio_vitt16", nested, module="student_b", **TINY)
    for flat in (tmp_path / "flat.pth", tmp_path / "flat.safetensors"):  # one state dict
        save_state_dict(a.state_dict(), flat)
        with pytest.raises(ValueError, match="holds one state dict, no trained module 'x'"):
            pixio.load_encoder("pixio_vitt16", flat, module="x", **TINY)


def test_convert_cli_from_checkpoint_dir(tiny_mae, tmp_path):
    final = training_checkpoint(tmp_path / "run", {"mae": tiny_mae})
    overrides = [f"--override={k}={v}" for k, v in TINY.items()]
    dst = tmp_path / "encoder.safetensors"
    argv = ["--model", "pixio_vitt16", "--input", str(final), "--output", str(dst), *overrides]
    assert run_main(convert_main, argv).returncode == 0
    _assert_encoder_of(pixio.load_encoder("pixio_vitt16", dst, **TINY), tiny_mae)


def test_convert_cli_module(tmp_path):
    a, b = _student(1), _student(2)
    final = training_checkpoint(tmp_path / "run", {"student_a": a, "student_b": b})
    overrides = [f"--override={k}={v}" for k, v in TINY.items()]
    dst = tmp_path / "student_b.safetensors"
    argv = ["--model", "pixio_vitt16", "--input", str(final), "--output", str(dst), *overrides]
    res = run_main(convert_main, argv)
    assert res.returncode == 2 and "Traceback" not in res.stderr and not dst.exists()
    assert "'student_a', 'student_b'): pass module=..." in res.stderr
    assert run_main(convert_main, [*argv, "--module", "student_b"]).returncode == 0
    _assert_encoder_of(pixio.load_encoder("pixio_vitt16", dst, **TINY), b)
    assert "last_proj.0.weight" not in pixio.read_state_dict(dst)


@pytest.mark.parametrize("case", ["same file", "same file via symlink", "same dir", "inside dir"])
def test_convert_refuses_to_overwrite_its_input(tiny_mae, tiny_encoder, tmp_path, case):
    run = tmp_path / "run"
    final = training_checkpoint(run, {"mae": tiny_mae})
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
        argv = ["--model", "pixio_vitt16", "--input", str(src), "--output", str(dst)]
        res = run_main(convert_main, argv)
        assert res.returncode == 2 and f"--output {dst} lies inside" in res.stderr
        assert "Traceback" not in res.stderr
    assert {p: p.read_bytes() for p in [pth, *final.iterdir()]} == before


def test_broadcast_encoder_state_fills_a_meta_built_encoder_strictly(tiny_encoder, tmp_path):
    from pixio.checkpoint import broadcast_encoder_state

    path = pixio.save_encoder(tiny_encoder, tmp_path / "enc.safetensors")
    with torch.device("meta"):  # nothing initialised: the file fills every value
        encoder = pixio.build_encoder("pixio_vitt16", **TINY)
    encoder.to_empty(device="cpu")
    broadcast_encoder_state(encoder, path)
    assert_same_weights(encoder, tiny_encoder)
    with torch.device("meta"):
        deeper = pixio.build_encoder("pixio_vitt16", **{**TINY, "depth": TINY["depth"] + 1})
    deeper.to_empty(device="cpu")
    # the file records its architecture: one line naming the differing size, not the keys
    with pytest.raises(ValueError, match=r"the model built has depth 4 \(file: 3\)$"):
        broadcast_encoder_state(deeper, path)
    plain = tmp_path / "enc.pth"  # no record: the size is read from the tensor shapes
    torch.save(tiny_encoder.state_dict(), plain)
    with pytest.raises(
        ValueError, match=r"does not fit the model: the model has depth 4 \(file: 3\)$"
    ):
        broadcast_encoder_state(deeper, plain)
