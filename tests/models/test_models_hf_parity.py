"""Exported folders load in transformers.PixioModel and give the same outputs as our encoder."""

import json

import pytest
import torch
from tests_helpers import TINY, assert_same_weights

import pixio

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    enc = pixio.build_encoder("pixio_vitt16", **TINY).eval()
    out = tmp_path_factory.mktemp("hf")
    pixio.export_hf(enc, out)
    hf = transformers.PixioModel.from_pretrained(out).eval()
    return enc, hf, out


@pytest.mark.parametrize("size", [(256, 256), (224, 320)])
def test_outputs_equal_transformers(exported, size):
    enc, hf, _ = exported
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = enc(x)
        theirs = hf(pixel_values=x, output_hidden_states=True)
    last = torch.cat([ours[-1]["cls_tokens_norm"], ours[-1]["patch_tokens_norm"]], dim=1)
    assert (theirs.last_hidden_state - last).abs().max() < 1e-5
    assert len(theirs.hidden_states) == enc.depth + 1
    for i, f in enumerate(ours):
        block = torch.cat([f["cls_tokens"], f["patch_tokens"]], dim=1)
        assert (theirs.hidden_states[i + 1] - block).abs().max() < 1e-5
    pooled = enc.embed(x)["embedding"]
    assert (theirs.pooler_output - pooled).abs().max() < 1e-5


def test_hf_folder_loads_back(exported):
    enc, _, folder = exported
    assert_same_weights(pixio.load_encoder("pixio_vitt16", folder, **TINY), enc)


def test_image_processor_config(exported):
    _, _, folder = exported
    proc = transformers.AutoImageProcessor.from_pretrained(folder)
    from PIL import Image

    img = Image.new("RGB", (640, 480), (124, 116, 104))
    pixels = proc(images=img, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 256, 256)
    # ImageNet normalisation of (124, 116, 104)/255 is close to zero in every channel
    assert pixels.abs().max() < 0.02
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    assert cfg["resample"] == 3 and cfg["image_mean"] == [0.485, 0.456, 0.406]
