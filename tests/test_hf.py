"""Hugging Face transformers checkpoints as weights (isvit.hf): small random transformers models,
written by ``save_pretrained``, load into the matching timm model and compute the same outputs
(to 1e-4); checkpoints that timm cannot express are refused in one sentence.

The configs set ``layer_norm_eps=1e-6``, timm's: transformers' ViT and DeiT default to 1e-12, and a
real checkpoint with that eps gives slightly different outputs in timm (around 1e-5). transformers
5.x writes safetensors only (``safe_serialization=False`` is gone): the ``pytorch_model.bin`` of older
releases is made by ``torch.save`` of the same state dict, which is what they wrote.
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

from isvit.errors import IsvitError
from isvit.models import create_model, load_weights

from conftest import TINY_VIT, random_images, torch_threads

# The same small ViT on both sides: 32x32 images, 8x8 patches (16 + prefix tokens), width 32, 2 blocks.
VIT_HF = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "layer_norm_eps": 1e-6}
VIT_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2}
# DINOv2: 56x56 images in 14x14 patches (4x4 of them), MLP 4x wide, LayerScale (timm's init_values).
DINO_HF = {"image_size": 56, "patch_size": 14, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
DINO_TIMM = {"img_size": 56, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2}
# Swin: 64x64 images, 16x16 then 8x8 then 4x4 tokens, windows of 4 (shifted in the first two stages):
# two patch mergings, which transformers keeps at the end of stages 0 and 1, timm at the start of 1 and 2.
SWIN_HF = {"image_size": 64, "patch_size": 4, "embed_dim": 32, "depths": [2, 2, 2], "num_heads": [2, 4, 8],
           "window_size": 4}
SWIN_TIMM = {"img_size": 64, "embed_dim": 32, "depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_size": 4}


def saved(hf_model, folder, bin_file: bool = False):
    """``hf_model`` written by save_pretrained into ``folder``: its weights file (``pytorch_model.bin``
    with ``bin_file``, as transformers 4.x wrote with safe_serialization=False)."""
    hf_model.save_pretrained(folder)
    path = folder / "model.safetensors"
    if bin_file:
        torch.save(load_file(str(path)), folder / "pytorch_model.bin")
        path.unlink()
        path = folder / "pytorch_model.bin"
    return path


def hf_model(cls, config_cls, seed: int = 0, **config):
    """A transformers model, randomly initialised and then every tensor moved by noise: transformers
    starts LayerNorms at 1 and 0, biases, LayerScale and Swin's relative position biases at constants,
    which would hide a tensor loaded into the wrong place."""
    torch.manual_seed(seed)
    model = cls(config_cls(**config)).eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor), alpha=0.05)
    return model


def timm_model(name: str, seed: int = 1, **kwargs):
    """The timm model, randomly initialised with another seed (so a tensor not loaded would show)."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4


LOGITS_CASES = {
    "vit": (transformers.ViTForImageClassification, transformers.ViTConfig, VIT_HF,
            "vit_tiny_patch16_224", VIT_TIMM, 32),
    # DeiT: timm's distilled model averages its two heads, as transformers' WithTeacher model does.
    "deit-with-teacher": (transformers.DeiTForImageClassificationWithTeacher, transformers.DeiTConfig, VIT_HF,
                          "deit_tiny_distilled_patch16_224", VIT_TIMM, 32),
    # transformers' DeiT without a teacher head: the class token's classifier alone.
    "deit": (transformers.DeiTForImageClassification, transformers.DeiTConfig, VIT_HF,
             "deit_tiny_distilled_patch16_224", VIT_TIMM, 32),
    "swin": (transformers.SwinForImageClassification, transformers.SwinConfig, SWIN_HF,
             "swin_tiny_patch4_window7_224", SWIN_TIMM, 64),
}


@pytest.mark.parametrize("case", LOGITS_CASES)
def test_a_classifier_checkpoint_gives_the_logits_of_the_transformers_model(tmp_path, case):
    hf_cls, config_cls, hf_args, name, timm_args, size = LOGITS_CASES[case]
    source = hf_model(hf_cls, config_cls, **hf_args, num_labels=10)
    model = timm_model(name, **timm_args, num_classes=10)
    load_weights(model, saved(source, tmp_path))
    images = random_images(2, size)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source(pixel_values=images).logits)


FEATURE_CASES = {
    # A pytorch_model.bin with a pooler, which timm has no place for (its features come before it).
    "vit-bin": (transformers.ViTModel, transformers.ViTConfig, VIT_HF, "vit_tiny_patch16_224", VIT_TIMM, 32),
    "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config, DINO_HF,
               "vit_small_patch14_dinov2", DINO_TIMM, 56),
    # Four register tokens after the class token; timm adds position embeddings to the patches only.
    "dinov2-registers": (transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig, DINO_HF,
                         "vit_small_patch14_reg4_dinov2", DINO_TIMM, 56),
    # DINOv2 giant's SwiGLU MLP: transformers' hidden width int(32 * 4 * 2/3) rounded up to 88 per half.
    "dinov2-swiglu": (transformers.Dinov2Model, transformers.Dinov2Config, {**DINO_HF, "use_swiglu_ffn": True},
                      "vit_giant_patch14_dinov2", {**DINO_TIMM, "mlp_ratio": 2 * 88 / 32}, 56),
}


@pytest.mark.parametrize("case", FEATURE_CASES)
def test_a_base_model_checkpoint_gives_the_features_of_the_transformers_model(tmp_path, case):
    hf_cls, config_cls, hf_args, name, timm_args, size = FEATURE_CASES[case]
    source = hf_model(hf_cls, config_cls, **hf_args)
    model = timm_model(name, **timm_args, num_classes=0)
    load_weights(model, saved(source, tmp_path, bin_file=case.endswith("-bin")))
    images = random_images(2, size)
    with torch.no_grad(), torch_threads(1):
        assert_close(model.forward_features(images), source(pixel_values=images).last_hidden_state)


def test_a_bare_swin_model_gives_the_pooled_features_of_the_transformers_model(tmp_path):
    source = hf_model(transformers.SwinModel, transformers.SwinConfig, **SWIN_HF)
    model = timm_model("swin_tiny_patch4_window7_224", **SWIN_TIMM, num_classes=0)
    # transformers 4.x also saved each block's relative_position_index (a buffer timm recomputes).
    path = saved(source, tmp_path)
    state = load_file(str(path))
    for key in [k for k in state if k.endswith(".relative_position_bias_table")]:
        state[key.replace("_bias_table", "_index")] = torch.zeros(16, 16, dtype=torch.int64)
    save_file(state, str(path))
    load_weights(model, path)
    images = random_images(2, 64)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source(pixel_values=images).pooler_output)


def test_create_model_reads_a_transformers_checkpoint_for_the_named_architecture(tmp_path):
    # timm's test_vit: 6 blocks of width 64 on 160x160 images, 1000 classes.
    source = hf_model(transformers.ViTForImageClassification, transformers.ViTConfig, image_size=160,
                      patch_size=16, hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
                      intermediate_size=192, layer_norm_eps=1e-6, num_labels=1000)
    model = create_model(TINY_VIT, saved(source, tmp_path), quantizable=True)
    images = random_images(1, 160)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source(pixel_values=images).logits)


def one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_a_dinov2_classifier_is_refused_in_one_sentence(tmp_path):
    source = hf_model(transformers.Dinov2ForImageClassification, transformers.Dinov2Config, **DINO_HF,
                      num_labels=10)
    model = timm_model("vit_small_patch14_dinov2", **DINO_TIMM, num_classes=10)
    with pytest.raises(IsvitError) as error:
        load_weights(model, saved(source, tmp_path))
    assert "Dinov2ForImageClassification" in one_sentence(error)
    assert "model.dinov2.save_pretrained" in str(error.value)


def test_a_deit_checkpoint_for_a_timm_vit_without_distillation_token_is_refused(tmp_path):
    source = hf_model(transformers.DeiTForImageClassificationWithTeacher, transformers.DeiTConfig, **VIT_HF,
                      num_labels=10)
    model = timm_model("deit_tiny_patch16_224", **VIT_TIMM, num_classes=10)
    with pytest.raises(IsvitError) as error:
        load_weights(model, saved(source, tmp_path))
    assert "distilled" in one_sentence(error)


def test_a_transformers_checkpoint_of_another_family_is_refused(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    model = timm_model("vit_tiny_patch16_224", **VIT_TIMM, num_classes=10)
    with pytest.raises(IsvitError) as error:
        load_weights(model, saved(transformers.BertModel(config), tmp_path))
    message = one_sentence(error)
    assert "not of a ViT, DeiT, DINOv2 or Swin model" in message and "embeddings.LayerNorm.bias" in message


def test_keys_left_over_or_missing_after_the_renaming_are_named(tmp_path):
    source = hf_model(transformers.ViTForImageClassification, transformers.ViTConfig, **VIT_HF, num_labels=10)
    state = load_file(str(saved(source, tmp_path)))
    state["vit.encoder.layer.1.adapter.weight"] = torch.zeros(4)
    del state["vit.encoder.layer.0.attention.attention.key.bias"]
    save_file(state, str(tmp_path / "edited.safetensors"))
    model = timm_model("vit_tiny_patch16_224", **VIT_TIMM, num_classes=10)
    with pytest.raises(IsvitError) as error:
        load_weights(model, tmp_path / "edited.safetensors")
    message = one_sentence(error)
    assert "transformers checkpoint" in message
    assert "missing keys (e.g. blocks.0.attn.qkv.bias)" in message
    # q and v biases cannot be fused without k's: they stay under their transformers names.
    assert "3 unexpected keys" in message and "vit.encoder.layer.1.adapter.weight" in message

