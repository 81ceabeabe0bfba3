"""Hugging Face transformers checkpoints as weights (isvit.hf): small random transformers models,
written by ``save_pretrained``, load into the matching timm model and compute the same outputs
(to 1e-4); checkpoints that timm cannot express are refused in one sentence.

The configs set ``layer_norm_eps=1e-6``, timm's: transformers' ViT and DeiT default to 1e-12, and a
real checkpoint with that eps gives slightly different outputs in timm (around 1e-5). transformers
5.x writes safetensors only (``safe_serialization=False`` is gone): the ``pytorch_model.bin`` of older
releases is made by ``torch.save`` of the same state dict, which is what they wrote.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import isvit
from isvit import hf
from isvit.checkpoint import load_quantized, save_quantized
from isvit.data import resolve_data_config
from isvit.errors import IsvitError
from isvit.models import create_model, load_model, load_weights

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
    assert "not of a ViT, DeiT, DINOv2, SigLIP, Swin, DINOv3 or SigLIP 2 NaFlex model" in message
    assert "embeddings.LayerNorm.bias" in message


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



# ---------------------------------------------------------------------------------------------
# DINOv3, SigLIP, SigLIP 2 NaFlex
# ---------------------------------------------------------------------------------------------

# DINOv3: 64x64 images in 16x16 patches (4x4), 4 register tokens, rotary embedding, LayerScale.
DINO3_HF = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_register_tokens": 4}
DINO3_TIMM = {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "token"}
# SigLIP: 64x64 images in 16x16 patches, no class token, an attention-pool head; tanh GELU as transformers' config.
SIGLIP_HF = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2}
SIGLIP_TIMM = {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2, "act_layer": "gelu_tanh"}
# A SiglipModel's text tower (left out by the renamer).
SIGLIP_TEXT = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

DINO3_CASES = {
    # q and v biases (transformers' defaults): timm's _qkvb DINOv3.
    "qkv-bias": ({}, "vit_small_patch16_dinov3_qkvb", {}),
    # No q/v biases: timm's DINOv3 without them.
    "no-bias": ({"query_bias": False, "value_bias": False}, "vit_small_patch16_dinov3", {}),
    # Gated MLP silu(gate) * up: timm's packed GluMlp (swiglu_mlp), gate rows first.
    "gated": ({"use_gated_mlp": True, "hidden_act": "silu"}, "vit_small_patch16_dinov3_qkvb", {"swiglu_mlp": True}),
    # The same with timm's SwiGLU of separate fc1_g / fc1_x (used where its MLP has a norm or alignment).
    "gated-swiglu": ({"use_gated_mlp": True, "hidden_act": "silu"}, "vit_small_patch16_dinov3_qkvb",
                     {"swiglu_mlp": True, "swiglu_align_to": 8}),
}


@pytest.mark.parametrize("case", DINO3_CASES)
def test_a_dinov3_folder_gives_the_features_of_the_transformers_model(tmp_path, case):
    hf_args, name, timm_args = DINO3_CASES[case]
    source = hf_model(transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig, **DINO3_HF, **hf_args)
    source.save_pretrained(tmp_path)
    model = timm_model(name, **DINO3_TIMM, **timm_args, num_classes=0)
    load_weights(model, tmp_path)  # the save_pretrained folder itself
    images = random_images(2, 64)
    with torch.no_grad(), torch_threads(1):
        out = source(pixel_values=images)
        assert_close(model.forward_features(images), out.last_hidden_state)
        assert_close(model(images), out.pooler_output)  # the normed class token


def test_a_dinov3_state_dict_under_its_in_memory_names_is_read_too(tmp_path):
    # transformers 5.x keeps the blocks at DINOv3ViTModel.model.layer (saved as layer.): a
    # torch.save of its state_dict() has them under model.layer.
    source = hf_model(transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig, **DINO3_HF)
    assert any(k.startswith("model.layer.0.") for k in source.state_dict())
    torch.save(source.state_dict(), tmp_path / "dinov3.pt")
    model = timm_model("vit_small_patch16_dinov3_qkvb", **DINO3_TIMM, num_classes=0)
    load_weights(model, tmp_path / "dinov3.pt")
    images = random_images(2, 64)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source(pixel_values=images).pooler_output)


def test_a_dinov3_with_q_and_v_biases_for_a_timm_dinov3_without_them_is_refused(tmp_path):
    source = hf_model(transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig, **DINO3_HF)
    source.save_pretrained(tmp_path)
    model = timm_model("vit_small_patch16_dinov3", **DINO3_TIMM, num_classes=0)
    with pytest.raises(IsvitError) as error:
        load_weights(model, tmp_path)
    assert "vit_small_patch16_dinov3_qkvb" in one_sentence(error)


def test_a_siglip_folder_gives_the_features_and_pooled_output_of_the_transformers_model(tmp_path):
    source = hf_model(transformers.SiglipVisionModel, transformers.SiglipVisionConfig, **SIGLIP_HF)
    source.save_pretrained(tmp_path)
    model = timm_model("vit_base_patch16_siglip_224", **SIGLIP_TIMM, num_classes=0)
    load_weights(model, tmp_path)
    images = random_images(2, 64)
    with torch.no_grad(), torch_threads(1):
        out = source(pixel_values=images)
        assert_close(model.forward_features(images), out.last_hidden_state)
        assert_close(model(images), out.pooler_output)  # the attention pool


def test_a_siglip_models_vision_tower_is_read_and_its_text_tower_left_out(tmp_path):
    config = transformers.SiglipConfig(vision_config=SIGLIP_HF, text_config=SIGLIP_TEXT)
    torch.manual_seed(0)
    source = transformers.SiglipModel(config).eval()
    source.save_pretrained(tmp_path)  # keys under vision_model. / text_model. (as every 4.x SigLIP)
    model = timm_model("vit_base_patch16_siglip_224", **SIGLIP_TIMM, num_classes=0)
    load_weights(model, tmp_path)
    images = random_images(2, 64)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source.vision_model(pixel_values=images).pooler_output)


def test_a_siglip_classifier_gives_its_logits_from_timm_average_pooling(tmp_path):
    config = transformers.SiglipConfig(vision_config=SIGLIP_HF, text_config=SIGLIP_TEXT, num_labels=10)
    torch.manual_seed(0)
    source = transformers.SiglipForImageClassification(config).eval()
    with torch.no_grad():
        for tensor in source.parameters():
            tensor.add_(torch.randn_like(tensor), alpha=0.05)
    source.save_pretrained(tmp_path)
    model = timm_model("vit_base_patch16_siglip_224", **SIGLIP_TIMM, num_classes=10, global_pool="avg", fc_norm=False)
    load_weights(model, tmp_path)
    images = random_images(2, 64)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source(pixel_values=images).logits)
    # with the attention pool timm would classify something else: refused
    with pytest.raises(IsvitError) as error:
        load_weights(timm_model("vit_base_patch16_siglip_224", **SIGLIP_TIMM, num_classes=10), tmp_path)
    assert "global_pool='avg' and fc_norm=False" in one_sentence(error)


def naflex_inputs(images: torch.Tensor, patch: int = 16) -> dict:
    """transformers' NaFlex inputs for whole images: patches flattened (row, column, channel) as its
    image processor cuts them, every one valid, each image's grid of patches."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    patches = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, -1)
    return {"pixel_values": patches, "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.long),
            "spatial_shapes": torch.tensor([[gh, gw]] * b)}


SIGLIP2_HF = {"num_patches": 16, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2}
SIGLIP2_TIMM = {"pos_embed_grid_size": (4, 4), "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2}


@pytest.mark.parametrize("size", [(64, 64), (48, 48), (96, 96), (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_siglip2_naflex_renamer_gives_the_transformers_models_outputs(tmp_path, size):
    # 64x64: the position grid's own size (4x4 patches), no resizing; the others resize it (bilinear,
    # antialiased, in both), also to a grid of another aspect.
    source = hf_model(transformers.Siglip2VisionModel, transformers.Siglip2VisionConfig, **SIGLIP2_HF)
    path = saved(source, tmp_path)
    model = timm_model("naflexvit_base_patch16_siglip", **SIGLIP2_TIMM, num_classes=0)
    load_weights(model, path)
    images = random_images(2, 64)
    images = torch.nn.functional.interpolate(images, size=size, mode="bilinear") if size != (64, 64) else images
    with torch.no_grad(), torch_threads(1):
        out = source(**naflex_inputs(images))
        assert_close(model.forward_features(images), out.last_hidden_state)
        assert_close(model(images), out.pooler_output)


def test_a_siglip2_naflex_folder_loads_and_is_left_alone_by_the_siglip_renamer(tmp_path):
    # The ViT adapter's SigLIP renamer (first in the registry) must leave the NaFlex checkpoint (a
    # Linear patch embedding) to the NaFlexVit adapter's.
    source = hf_model(transformers.Siglip2VisionModel, transformers.Siglip2VisionConfig, **SIGLIP2_HF)
    source.save_pretrained(tmp_path)
    model = timm_model("naflexvit_base_patch16_siglip", **SIGLIP2_TIMM, num_classes=0)
    load_weights(model, tmp_path)
    images = random_images(2, 64)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source(**naflex_inputs(images)).pooler_output)


@pytest.mark.parametrize("case", ["dinov3", "siglip2-naflex"])
def test_a_family_reads_its_own_config_values_and_the_rebuilt_model_needs_no_more(case, tmp_path):
    # DINOv3's rope_theta is timm's rope_temperature; SigLIP 2 NaFlex's num_patches its position grid
    name, small, key, default, value, argument, check = {
        "dinov3": ("vit_small_patch16_dinov3", {"embed_dim": 32, "depth": 1, "num_heads": 2}, "rope_theta", 100.0,
                   10000.0, {"rope_temperature": 10000.0}, lambda m: m.rope.temperature == 10000.0),
        "siglip2-naflex": ("naflexvit_base_patch16_siglip", {"embed_dim": 32, "depth": 1, "num_heads": 2}, "num_patches",
                           256, 64, {"pos_embed_grid_size": [8, 8]}, lambda m: tuple(m.embeds.pos_embed.shape[1:3]) == (8, 8)),
    }[case]
    model = timm_model(name, **small)
    assert hf.config_model_args({key: default}, model, name, tmp_path) == {}
    assert hf.config_model_args({key: value}, model, name, tmp_path) == argument
    rebuilt = timm_model(name, **small, **argument)
    assert check(rebuilt) and hf.config_model_args({key: value}, rebuilt, name, tmp_path) == {}
    with pytest.raises(IsvitError) as error:
        hf.config_model_args({key: 20 if case == "siglip2-naflex" else "high"}, model, name, tmp_path)
    assert key in one_sentence(error) and "config.json" in one_sentence(error)


# ---------------------------------------------------------------------------------------------
# save_pretrained folders: weights files, shards, config.json
# ---------------------------------------------------------------------------------------------

def small_vit_classifier(**config):
    return hf_model(transformers.ViTForImageClassification, transformers.ViTConfig, **{**VIT_HF, **config},
                    num_labels=10)


def assert_loads_like(source, folder) -> None:
    model = timm_model("vit_tiny_patch16_224", **VIT_TIMM, num_classes=10)
    load_weights(model, folder)
    images = random_images(2, 32)
    with torch.no_grad(), torch_threads(1):
        assert_close(model(images), source(pixel_values=images).logits)


def test_a_sharded_safetensors_folder_is_read_through_its_index(tmp_path):
    source = small_vit_classifier()
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    assert_loads_like(source, tmp_path)


def test_a_sharded_pytorch_bin_folder_is_read_through_its_index(tmp_path):
    # transformers 4.x's pytorch_model-0000i-of-0000n.bin shards and their index, written by hand
    # (5.x writes safetensors only) from the tensors it saves (the names on file, not those in memory).
    source = small_vit_classifier()
    state = load_file(str(saved(source, tmp_path)))
    (tmp_path / "model.safetensors").unlink()
    halves = [dict(list(state.items())[: len(state) // 2]), dict(list(state.items())[len(state) // 2:])]
    weight_map = {}
    for i, half in enumerate(halves):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save(half, tmp_path / name)
        weight_map.update(dict.fromkeys(half, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_loads_like(source, tmp_path)


def test_a_folder_with_a_single_pytorch_bin_is_read(tmp_path):
    source = small_vit_classifier()
    saved(source, tmp_path, bin_file=True)
    assert_loads_like(source, tmp_path)


def test_config_json_sets_image_size_activation_and_layernorm_eps_and_a_quantized_model_keeps_them(tmp_path):
    # transformers' ViT default eps 1e-12 (timm's 1e-6), tanh GELU, 96x96 images (timm's test_vit: 160x160).
    source = hf_model(transformers.ViTForImageClassification, transformers.ViTConfig, image_size=96, patch_size=16,
                      hidden_size=64, num_hidden_layers=6, num_attention_heads=2, intermediate_size=192,
                      hidden_act="gelu_pytorch_tanh", num_labels=1000)
    source.save_pretrained(tmp_path / "hf")
    model, model_args = load_model(TINY_VIT, tmp_path / "hf", quantizable=True)
    assert model_args == {"img_size": 96, "act_layer": "gelu_tanh", "layer_norm_eps": 1e-12}
    assert model.blocks[0].norm1.eps == model.norm.eps == 1e-12
    assert resolve_data_config(model)["input_size"] == [3, 96, 96]
    images = random_images(2, 96)
    with torch.no_grad(), torch_threads(1):
        assert (model(images) - source(pixel_values=images).logits).abs().max().item() < 1e-5
    config = isvit.MinmaxConfig(w_bits=8, a_bits=8, calib_size=8)
    with torch_threads(1):
        qmodel = isvit.quantize(model, random_images(8, 96), config, progress=False)
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name=TINY_VIT, config=config, data_config={"input_size": [3, 96, 96]},
                   model_args=model_args)
    rebuilt, info = load_quantized(path)
    assert info["model_args"] == model_args
    with torch.no_grad(), torch_threads(1):
        assert torch.equal(rebuilt(images), qmodel(images))


def test_a_folder_of_timm_weights_with_timms_config_json_is_read_as_it_is(tmp_path):
    # timm's own hub folders: model.safetensors of timm's keys and a config.json of timm's
    # (architecture, pretrained_cfg ...), no transformers model_type: the config is not read.
    weights = timm_model(TINY_VIT, seed=3).state_dict()
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": TINY_VIT, "image_size": 999}))
    assert hf.read_config(tmp_path) is None
    model, model_args = load_model(TINY_VIT, tmp_path)
    assert model_args == {}
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def broken_folder(tmp_path, what: str):
    source = small_vit_classifier(image_size=224, patch_size=16)
    if what == "no weights":
        source.config.save_pretrained(tmp_path)
    elif what == "missing shard":
        source.save_pretrained(tmp_path, max_shard_size="20KB")
        sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    elif what == "damaged index":
        source.save_pretrained(tmp_path, max_shard_size="20KB")
        (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    elif what == "damaged config":
        source.save_pretrained(tmp_path)
        (tmp_path / "config.json").write_text("{not json")
    elif what == "unknown activation":
        source.config.hidden_act = "gelu_10"
        source.save_pretrained(tmp_path)
    return tmp_path


BROKEN = {
    "no weights": "holds no weights: isvit looks for model.safetensors, pytorch_model.bin",
    "missing shard": "names the shard model-00",
    "damaged index": "cannot read",
    "damaged config": "config.json as JSON",
    "unknown activation": "hidden_act 'gelu_10'",
}


@pytest.mark.parametrize("what", BROKEN)
def test_a_broken_folder_is_refused_in_one_sentence_before_any_work(tmp_path, what, monkeypatch):
    folder = broken_folder(tmp_path, what)
    monkeypatch.setattr(isvit.models, "load_weights", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(IsvitError) as error:
        load_model("vit_tiny_patch16_224", folder)
    assert BROKEN[what] in one_sentence(error)


def test_a_config_that_the_timm_model_cannot_express_is_refused_before_the_weights(tmp_path, monkeypatch):
    # A DINOv3 with a SiLU MLP: timm's Eva takes no act_layer.
    source = hf_model(transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig, **DINO3_HF, hidden_act="silu")
    source.save_pretrained(tmp_path)
    monkeypatch.setattr(isvit.models, "load_weights", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(IsvitError) as error:
        load_model("vit_small_patch16_dinov3_qkvb", tmp_path)
    message = one_sentence(error)
    assert "cannot be built with" in message and "act_layer='silu'" in message
    # An argument the model takes but does not apply (as Eva's SwiGLU keeps SiLU whatever it is given)
    # leaves the difference, which is named.
    source = small_vit_classifier(hidden_act="gelu_pytorch_tanh")
    source.save_pretrained(tmp_path / "vit")
    monkeypatch.setattr(isvit.models, "build_model", lambda name, args, where: timm.create_model(name))
    with pytest.raises(IsvitError) as error:
        load_model("vit_tiny_patch16_224", tmp_path / "vit")
    message = one_sentence(error)
    assert "cannot express" in message and "'act_layer': 'gelu_tanh'" in message


def test_the_command_line_records_the_config_arguments_in_the_quantized_and_exported_files(tmp_path, image_folder):
    from isvit.cli import main

    source = hf_model(transformers.ViTForImageClassification, transformers.ViTConfig, image_size=96, patch_size=16,
                      hidden_size=64, num_hidden_layers=6, num_attention_heads=2, intermediate_size=192,
                      num_labels=1000)
    source.save_pretrained(tmp_path / "hf")
    expected = {"img_size": 96, "layer_norm_eps": 1e-12}  # transformers' eps; its exact GELU is timm's
    quantized, onnx_file = tmp_path / "q.safetensors", tmp_path / "fp.onnx"
    with torch_threads(1):
        assert main(["quantize", "--model", TINY_VIT, "--weights", str(tmp_path / "hf"), "--calib", str(image_folder),
                     "--calib-size", "2", "--method", "minmax", "--w-bits", "8", "--a-bits", "8", "--device", "cpu",
                     "--quiet", "--save", str(quantized)]) == 0
        assert main(["export", "--model", TINY_VIT, "--weights", str(tmp_path / "hf"), "--onnx", str(onnx_file)]) == 0
    model, info = load_quantized(quantized)
    assert info["model_args"] == expected and info["data_config"]["input_size"] == [3, 96, 96]
    assert model.blocks[0].norm1.eps == 1e-12
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(metadata["model_args"]) == expected
