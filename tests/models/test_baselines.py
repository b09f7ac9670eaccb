"""Baseline adapters (transformers ViT / ViTMAE / DINOv2, timm ViTs and hybrids): their features
are the model's own hidden states; checkpoints load strictly with one-line errors."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import TINY_HF, save_hf_folder, save_timm_weights, tiny_hf, tiny_timm

from pixio.checkpoint import broadcast_checked_state
from pixio.constants import IMAGENET_MEAN, IMAGENET_STD
from pixio.models.baselines import BaselineError, build_baseline

BLOCKS = [0, 2, 3]


def hf_reference(encoder, x: torch.Tensor):
    """The transformers model's own forward: hidden states (embeddings, then each layer) and
    the final-normed last hidden state."""
    kwargs = {"output_hidden_states": True}
    if encoder.name in ("vit", "vit_mae"):
        kwargs["interpolate_pos_encoding"] = True
    if encoder.name == "vit_mae":  # ascending noise: no shuffle (mask ratio 0 keeps every patch)
        h, w = encoder.patch_grid(x)
        kwargs["noise"] = torch.arange(h * w, dtype=torch.float32).expand(x.shape[0], -1)
    with torch.no_grad():
        out = encoder.model(x, **kwargs)
    return out.hidden_states, out.last_hidden_state


@pytest.mark.parametrize("name", sorted(TINY_HF))
def test_transformers_features_are_the_models_hidden_states(name):
    encoder = tiny_hf(name)
    x = torch.randn(2, 3, 70, 42)  # a 5 x 3 grid, not the 4 x 4 of the position table
    with torch.no_grad():
        feats = encoder.features(x, BLOCKS)
    hidden, last = hf_reference(encoder, x)
    first_patch = 1 + encoder.n_register_tokens  # DINOv2's registers are skipped
    assert encoder.n_register_tokens == TINY_HF[name].get("num_register_tokens", 0)
    for f, block in zip(feats, BLOCKS, strict=True):
        ref = hidden[block + 1]  # hidden[0] is the embedding output
        assert f["patch_tokens"].shape == (2, 15, 32) and f["cls_tokens"].shape == (2, 1, 32)
        torch.testing.assert_close(f["cls_tokens"], ref[:, :1], rtol=0, atol=1e-5)
        torch.testing.assert_close(f["patch_tokens"], ref[:, first_patch:], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[-1]["cls_tokens_norm"], last[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[-1]["patch_tokens_norm"], last[:, first_patch:], rtol=0, atol=1e-5)  # fmt: skip
    assert (encoder.patch_size, encoder.embed_dim, encoder.depth, encoder.n_cls_tokens) == (14, 32, 4, 1)  # fmt: skip


def test_vit_mae_evaluates_every_patch_in_order_whatever_the_seed():
    encoder = tiny_hf("vit_mae")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.manual_seed(1)
        a = encoder.features(x, [3])[0]["patch_tokens"]
        torch.manual_seed(2)
        b = encoder.features(x, [3])[0]["patch_tokens"]
    assert a.shape == (1, 16, 32)  # mask ratio 0.75 by default: 4 tokens if masking were on
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_base_r50_s16_224"])
def test_timm_features_are_the_models_intermediates(name):
    encoder = tiny_timm(name)
    x = torch.randn(2, 3, 96, 48)  # 6 x 3 grid; the table is 4 x 4
    model, prefix = encoder.model, encoder.model.num_prefix_tokens
    with torch.no_grad():
        feats = encoder.features(x, BLOCKS)
        inside = encoder.renormalize(x)  # the model's own input statistics (timm: 0.5 / 0.5)
        inter = model.forward_intermediates(inside, indices=BLOCKS, norm=False, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)  # fmt: skip
        final = model.forward_features(inside)
    assert encoder.patch_size == 16 and encoder.n_register_tokens == (2 if "r50" not in name else 0)
    for f, (patches, prefix_tokens) in zip(feats, inter, strict=True):
        assert f["patch_tokens"].shape == (2, 18, 32)
        torch.testing.assert_close(f["patch_tokens"], patches, rtol=0, atol=1e-5)
        torch.testing.assert_close(f["cls_tokens"], prefix_tokens[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[-1]["cls_tokens_norm"], final[:, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(feats[-1]["patch_tokens_norm"], final[:, prefix:], rtol=0, atol=1e-5)  # fmt: skip


def test_images_are_renormalised_to_the_models_own_statistics():
    encoder = tiny_timm("vit_base_patch16_224")  # trained with mean = std = 0.5
    pixels = torch.rand(1, 3, 32, 48)
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # fmt: skip
    torch.testing.assert_close(encoder.renormalize(imagenet), (pixels - 0.5) / 0.5, rtol=0, atol=1e-6)  # fmt: skip
    dino = tiny_hf("dinov2")  # no preprocessor_config.json: ImageNet statistics, untouched
    assert dino.renormalize(imagenet) is imagenet


def test_a_transformers_folder_loads_through_read_state(tmp_path):
    folder = save_hf_folder("vit_mae", tmp_path / "mae", seed=3)
    with torch.device("meta"):
        encoder = build_baseline("transformers", "vit_mae", str(folder))
    state = encoder.read_state(str(folder))
    encoder.to_empty(device="cpu")
    encoder.model.load_state_dict(state, strict=True)
    reference = tiny_hf("vit_mae", seed=3)
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        a, b = encoder.features(x, [1])[0], reference.features(x, [1])[0]
    torch.testing.assert_close(a["patch_tokens_norm"], b["patch_tokens_norm"], rtol=0, atol=0)


def test_transformers_mismatches_are_one_line_errors(tmp_path):
    dino = save_hf_folder("dinov2", tmp_path / "dino")
    with pytest.raises(ValueError, match=r"holds a 'dinov2' model, not 'vit_mae' \(encoder.name\)"):
        build_baseline("transformers", "vit_mae", str(dino))
    # Weights of a 32-wide model under a config that says 48: the shapes are named.
    vit = save_hf_folder("vit", tmp_path / "vit")
    encoder = build_baseline("transformers", "vit", str(vit), hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError) as err:
        encoder.read_state(str(vit))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{vit} does not match the encoder: other shapes")  # fmt: skip
    assert "embeddings.cls_token (1, 1, 32) (the model's: (1, 1, 48))" in message
    with pytest.raises(ValueError, match="unknown transformers model 'vit_hybrid'"):
        build_baseline("transformers", "vit_hybrid")
    with pytest.raises(BaselineError, match="ViTConfig has no field 'hiden_size'") as err:
        build_baseline("transformers", "vit", hiden_size=8)
    assert err.value.key == "model_kwargs"


def test_timm_weights_load_with_the_classifier_dropped_and_mismatches_named(tmp_path):
    path = save_timm_weights("vit_base_r50_s16_224", tmp_path / "hybrid.pth", seed=4, num_classes=10)  # fmt: skip
    encoder = tiny_timm("vit_base_r50_s16_224", seed=9)
    state = encoder.read_state(str(path))  # head.weight / head.bias ignored
    encoder.model.load_state_dict(state, strict=True)
    saved = torch.load(path, weights_only=True)
    assert "head.weight" in saved and "head.weight" not in state
    torch.testing.assert_close(encoder.model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])  # fmt: skip
    deeper = tiny_timm("vit_base_r50_s16_224", depth=5)  # the strict check is the loader's
    with pytest.raises(ValueError, match=r"hybrid.pth does not match the encoder: missing keys \['blocks.4"):  # fmt: skip
        broadcast_checked_state(deeper.model, lambda: deeper.read_state(str(path)), str(path))


def test_unknown_or_unsupported_timm_models_are_refused():
    with pytest.raises(ValueError, match="unknown timm model 'vit_bse_patch16_224' .*did you mean"):
        build_baseline("timm", "vit_bse_patch16_224")
    with pytest.raises(BaselineError, match="timm model 'resnet18' is not a VisionTransformer") as err:  # fmt: skip
        build_baseline("timm", "resnet18")
    assert err.value.key == "name"
    with pytest.raises(BaselineError, match="timm model 'vit_base_patch16_224' does not take these arguments") as err:  # fmt: skip
        build_baseline("timm", "vit_base_patch16_224", embed_dimm=32)
    assert err.value.key == "model_kwargs"  # a typo of the user's, not a model that is no ViT
    with pytest.raises(ValueError, match="has no class token"):
        build_baseline("timm", "vit_base_patch16_224", class_token=False, global_pool="avg", embed_dim=32, depth=1, num_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="unknown baseline source 'hub'"):
        build_baseline("hub", "vit")


@pytest.mark.parametrize("head", ["ViTMAEForPreTraining", "ViTForImageClassification"])
def test_released_folder_layouts_load_without_their_heads(head, tmp_path):
    """The hub's folders hold the task model (prefixed keys, a decoder or a classifier) and a
    preprocessor_config.json: the encoder's weights load exactly, the rest is dropped."""
    import json

    import transformers

    name = "vit_mae" if "MAE" in head else "vit"
    torch.manual_seed(7)
    config = build_baseline("transformers", name, **TINY_HF[name]).model.config
    model = getattr(transformers, head)(config).eval()
    model.save_pretrained(tmp_path / "release")
    stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (tmp_path / "release" / "preprocessor_config.json").write_text(json.dumps(stats))
    with torch.device("meta"):
        encoder = build_baseline("transformers", name, str(tmp_path / "release"))
    state = encoder.read_state(str(tmp_path / "release"))
    assert not any(k.startswith(("decoder", "classifier")) for k in state)
    inner = model.vit.state_dict()  # the encoder inside the task model
    assert set(state) == set(inner)
    for key, value in inner.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert (encoder.mean, encoder.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_an_unreadable_checkpoint_is_one_line_naming_it(tmp_path):
    folder = save_hf_folder("vit", tmp_path / "vit")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    encoder = tiny_hf("vit")
    with pytest.raises(ValueError) as err:
        broadcast_checked_state(encoder.model, lambda: encoder.read_state(str(folder)), str(folder))
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
