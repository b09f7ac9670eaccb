"""Weight files carry their architecture: every .safetensors file Pixio writes records it, every
reader builds from it, and a name or size that disagrees is one line naming the sizes."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tests_helpers import TINY, TINY_DECODER, assert_same_weights, run_main

import pixio
from pixio.architecture import ArchitectureError, from_metadata
from pixio.checkpoint import read_architecture, save_mae
from pixio.convert import main as convert_main
from pixio.hub import EncoderOnlyCheckpointError, hub_entries, load_mae

SHRUNK = dict(depth=2, img_size=64)  # a registry size (pixio_vitt16) shrunk: depth and grid


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def _convert(*args: str) -> subprocess.CompletedProcess:
    """`python -m pixio.convert ARGS`, in this process."""
    return run_main(convert_main, list(args))


@pytest.fixture
def shrunk(tmp_path):
    torch.manual_seed(0)
    encoder = pixio.build_encoder("pixio_vitt16", **SHRUNK)
    return encoder, pixio.save_encoder(encoder, tmp_path / "enc.safetensors")


def test_save_encoder_records_every_size_as_strings(shrunk):
    _, path = shrunk
    assert _metadata(path) == {
        "format": "pt", "pixio.format": "1", "pixio.kind": "encoder", "pixio.name": "pixio_vitt16",
        "pixio.embed_dim": "192", "pixio.depth": "2", "pixio.num_heads": "3",
        "pixio.mlp_ratio": "4.0", "pixio.patch_size": "16", "pixio.n_cls_tokens": "8",
        "pixio.img_size": "64",
    }  # fmt: skip


def test_load_encoder_needs_no_name_nor_sizes(shrunk):
    encoder, path = shrunk
    assert_same_weights(pixio.load_encoder(path), encoder)
    assert_same_weights(pixio.load_encoder("pixio_vitt16", path), encoder)  # same name: fine
    assert_same_weights(pixio.load_encoder(path, depth=2, drop_path=0.1), encoder)  # agreeing


def test_a_differing_name_or_size_is_one_line_naming_the_sizes(shrunk):
    _, path = shrunk
    with pytest.raises(ArchitectureError) as err:
        pixio.load_encoder("pixio_vits16", path)
    text = str(err.value)
    assert "\n" not in text and "keys" not in text and text.startswith(str(path))
    assert "embed_dim 384 (file: 192), depth 12 (file: 2), num_heads 6 (file: 3), img_size 256 (file: 64)" in text  # fmt: skip
    with pytest.raises(ArchitectureError, match=r"asked for depth 4 \(file: 2\):"):
        pixio.load_encoder(path, depth=4)


def test_a_file_without_record_needs_the_name(tmp_path, shrunk):
    encoder, _ = shrunk
    plain = tmp_path / "plain.safetensors"
    save_file(encoder.state_dict(), str(plain))
    assert read_architecture(plain) is None
    with pytest.raises(ArchitectureError, match="does not record its architecture"):
        pixio.load_encoder(plain)
    assert_same_weights(pixio.load_encoder("pixio_vitt16", plain, **SHRUNK), encoder)


def test_a_malformed_or_newer_record_is_refused_naming_the_key(tmp_path):
    base = {"pixio.format": "1", "pixio.kind": "encoder", "pixio.embed_dim": "64"}
    with pytest.raises(ArchitectureError, match="f.safetensors: metadata lacks pixio.depth"):
        from_metadata(base, "f.safetensors")
    with pytest.raises(ArchitectureError, match="pixio.depth 'two' is not a valid int"):
        from_metadata({**base, "pixio.depth": "two"}, "f.safetensors")
    with pytest.raises(ArchitectureError, match="metadata format '2'"):
        from_metadata({**base, "pixio.format": "2"}, "f.safetensors")


def test_hub_and_timm_build_from_the_record(shrunk):
    import timm

    encoder, path = shrunk
    assert_same_weights(hub_entries()["pixio_vitt16"](weights=path), encoder)
    model = timm.create_model("pixio_vitt16", pretrained=True, pretrained_cfg_overlay={"file": str(path)})  # fmt: skip
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in encoder.state_dict().items())
    assert len(model.blocks) == 2 and model.grid_size == (4, 4)
    with pytest.raises(ValueError, match=r"asked for depth 3 \(file: 2\)"):
        timm.create_model("pixio_vitt16", pretrained=True, depth=3, pretrained_cfg_overlay={"file": str(path)})  # fmt: skip


def test_convert_without_model_keeps_the_record(shrunk, tmp_path):
    encoder, path = shrunk
    out = tmp_path / "copy.safetensors"
    res = _convert("--input", str(path), "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert _metadata(out) == _metadata(path)
    assert_same_weights(pixio.load_encoder(out), encoder)


def test_convert_shape_mismatch_is_one_line_naming_the_sizes(shrunk, tmp_path):
    """Before: a grid that differs ended in a RuntimeError traceback (size mismatch for
    pos_embed) and a missing block in a list of 20 keys."""
    encoder, _ = shrunk
    ref = tmp_path / "ref.pth"  # the reference format records nothing: sizes from the shapes
    torch.save(encoder.state_dict(), ref)
    res = _convert("--model", "pixio_vitt16", "--override=depth=2", "--input", str(ref), "--output", str(tmp_path / "o.pth"))  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == f"error: {ref} does not fit the model: the model has img_size 256 (file: 64)\n"  # fmt: skip
    res = _convert("--model", "pixio_vitt16", "--input", str(ref), "--output", str(tmp_path / "o.pth"))  # fmt: skip
    assert res.stderr == f"error: {ref} does not fit the model: the model has depth 12 (file: 2), img_size 256 (file: 64)\n"  # fmt: skip
    assert not (tmp_path / "o.pth").exists()


def test_full_file_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    mae = pixio.build_mae("pixio_vitt16", **TINY, **TINY_DECODER, img_size=64, mask_grid=2)
    path = save_mae(mae, tmp_path / "mae.safetensors")
    meta = _metadata(path)
    assert meta["pixio.kind"] == "mae" and meta["pixio.decoder_depth"] == "2"
    assert meta["pixio.mask_grid"] == "2" and meta["pixio.norm_pix_loss"] == "true"
    loaded = load_mae(path)
    assert_same_weights(loaded, mae)
    assert loaded.mask_grid == 2 and loaded.norm_pix_loss
    assert_same_weights(hub_entries()["pixio_mae_vitt16"](weights=path), mae)
    encoder = pixio.load_encoder(path)  # the encoder part of a full file
    assert set(encoder.state_dict()) == set(mae.encoder_state_dict())
    with pytest.raises(EncoderOnlyCheckpointError, match="holds an encoder only"):
        load_mae(pixio.save_encoder(encoder, tmp_path / "enc.safetensors"))
    with pytest.raises(ArchitectureError, match=r"asked for decoder_depth 3 \(file: 2\)"):
        load_mae(path, decoder_depth=3)


def test_convert_full_from_a_training_checkpoint(cpu_config, tmp_path):
    """A tiny pre-training run's checkpoint -> one full file (reference keys, decoder sizes,
    mask_grid and norm_pix_loss from the run's config) and its encoder, no name needed."""
    from pixio.runtime.config import to_container
    from pixio.runtime.distributed import DistInfo
    from pixio.runtime.trainer import Trainer
    from pretraining.config import build_model
    from pretraining.task import MAETask

    cfg = cpu_config("train.epochs=1", "train.iters_per_epoch=2", "train.save_every_iters=2")
    torch.manual_seed(0)
    task = MAETask(build_model(cfg), cfg.model.mask_ratio, cfg.optim, cfg.model.name)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    trainer = Trainer(cfg, task, batches, info, to_container(cfg))
    trainer.fit()
    ckpt, full = tmp_path / "run" / "checkpoint-last", tmp_path / "full.safetensors"
    res = _convert("--full", "--input", str(ckpt), "--output", str(full))
    assert res.returncode == 0, res.stderr
    state = trainer.full_state()
    mae = load_mae(full)
    assert set(mae.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in mae.state_dict().items())
    arch = read_architecture(full)
    assert (arch["embed_dim"], arch["depth"], arch["img_size"], arch["mask_grid"]) == (32, 2, (64, 64), 2)  # fmt: skip
    assert (arch["decoder_embed_dim"], arch["decoder_depth"], arch["decoder_num_heads"]) == (32, 1, 2)  # fmt: skip
    encoder = pixio.load_encoder(ckpt)  # the run's config says what to build
    assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    exported = read_architecture(tmp_path / "run" / "encoder.safetensors")
    assert exported == {
        "kind": "encoder", "name": "pixio_vitt16", "embed_dim": 32, "depth": 2, "num_heads": 2,
        "mlp_ratio": 4.0, "patch_size": 16, "n_cls_tokens": 8, "img_size": (64, 64),
    }  # fmt: skip


def test_evaluation_encoder_builds_from_the_record(shrunk):
    """evaluation's `encoder` group: sizes from the file; a name of other sizes is a config error."""
    from omegaconf import OmegaConf

    from evaluation.features import EncoderConfig, load_frozen_encoder, pixio_build
    from pixio.runtime.config import ConfigError

    encoder, path = shrunk
    cfg = OmegaConf.structured(EncoderConfig(name="pixio_vitt16", checkpoint=str(path)))
    assert pixio_build(cfg)[1]["depth"] == 2
    assert_same_weights(load_frozen_encoder(cfg), encoder)
    cfg.name = "pixio_vith16"  # the group's default, left on
    with pytest.raises(ConfigError, match=r"^encoder.checkpoint: .* asked for embed_dim 1280 \(file: 192\)"):  # fmt: skip
        pixio_build(cfg)


def test_distillation_teacher_of_other_sizes_names_them(shrunk):
    from distillation.model import teacher_loader
    from pixio.runtime.config import ConfigError
    from pixio.runtime.parallel import materialize

    _, path = shrunk
    with torch.device("meta"):
        teacher = pixio.build_encoder("pixio_vitt16", depth=3, img_size=64)
    teacher = materialize(teacher, torch.device("cpu"), initialize=False)
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint: .*; the model built has depth 3 \(file: 2\) \(check"):  # fmt: skip
        teacher_loader(path)(teacher)
