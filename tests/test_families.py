"""BEiT, EVA-02 and Swin V2 (timm ``Beit``, ``Eva``, ``SwinTransformerV2``): small random models
through every method.

Per family: the wrapped model with every quantizer off is the original (the surgery is exact);
the post-LayerNorm fold leaves the full-precision function unchanged (each folded LayerNorm feeds
only its Linear; Swin V2's post-norm blocks have no pair to fold); minmax and repq at W8/A8 agree with full precision on most of a batch; the
isvit fast preset at W4/A4 runs (rotation refused in one sentence, the preset warns and goes
without); a saved checkpoint reloads bit-exact; the ONNX export computes what PyTorch computes
(the tolerance of test_export.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch

import isvit
from isvit.checkpoint import load_quantized, save_quantized
from isvit.errors import IsvitError
from isvit.export import export_onnx, folded_tables, load_onnx
from isvit.modules import QuantLinear, QuantMatMul
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm, placement_for
from isvit.rotate import rotate_model
from isvit.wrap import Placement, forward_units, is_block, post_layernorm_pairs, wrap_model

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
# EVA-02 base's layout (SwiGLU with fc1_g / fc1_x and a sub-LayerNorm, separate q/k/v projections)
# with a sub-LayerNorm before attn.proj as well; tiny's packed GluMlp and fused qkv below.
FAMILIES = {
    "beit": ("beit_base_patch16_224", SMALL),
    "eva": ("eva02_base_patch14_224", {**SMALL, "ref_feat_shape": (4, 4), "scale_attn_inner": True}),
    # 8x8 tokens in windows of 4 (shifted in the first stage), then 4x4 in one window
    "swinv2": ("swinv2_tiny_window8_256", {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 32,
                                           "depths": (2, 2), "num_heads": (2, 2), "num_classes": 10}),
}
VARIANTS = {
    **FAMILIES,
    "beit-swiglu": ("beit_base_patch16_224", {**SMALL, "swiglu_mlp": True, "scale_mlp": True}),
    "eva02-tiny": ("eva02_tiny_patch14_224", {**SMALL, "ref_feat_shape": (4, 4)}),
}


def small_model(family: str) -> torch.nn.Module:
    """A random model in which every part counts: timm's initialisation leaves the head, BEiT's
    relative position bias tables and q/v biases near zero, LayerScale at 0.1 and Swin V2's
    post-norms at zero (every block an identity); all are redrawn, and every Linear of the blocks
    gets weights of unit gain."""
    name, args = VARIANTS[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            leaf = key.rsplit(".", 1)[-1]
            if leaf.startswith("gamma"):
                p.fill_(1.0)
            elif leaf in ("q_bias", "v_bias", "relative_position_bias_table"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 1 and "norm" in key and leaf == "weight":
                p.normal_(1.0, 0.2)
            elif p.dim() == 2 and leaf == "weight":
                p.normal_(0.0, p.shape[1] ** -0.5)
        (model.head.fc if family == "swinv2" else model.head).weight.normal_(0.0, 0.5)
    return model


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SMALL["img_size"], SMALL["img_size"], generator=torch.Generator().manual_seed(seed))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


@pytest.mark.parametrize("family", VARIANTS)
def test_disabled_quantizers_give_the_original_logits(family):
    model = small_model(family)
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    x = images(4, seed=1)
    with torch.no_grad():
        expected = model(x)
        got, units = wrapped(x), x
        for unit in forward_units(wrapped):
            units = unit(units)
    assert expected.std(1).min() > 0.5  # logits that differ
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(units, expected, atol=1e-5, rtol=1e-5)
    # every Linear is quantized (but Swin V2's position-bias MLP), and both products of every attention
    assert not any(type(m) is torch.nn.Linear and "cpb_mlp" not in n for n, m in wrapped.named_modules())
    blocks = sum(is_block(unit.body) for unit in forward_units(wrapped))
    assert blocks == 4 if family == "swinv2" else blocks == SMALL["depth"]
    assert sum(isinstance(m, QuantMatMul) for m in wrapped.modules()) == 2 * blocks


@pytest.mark.parametrize("family", VARIANTS)
def test_the_post_layernorm_fold_leaves_the_function_unchanged(family):
    model = small_model(family)
    wrapped = wrap_model(copy.deepcopy(model), placement_for(isvit.QuantConfig(method="repq", w_bits=8, a_bits=8)))
    calibrate_weights(wrapped)
    calibrate_activations(wrapped, images(8, seed=2))
    isvit.set_quantizers(wrapped, False)
    fold_post_layernorm(wrapped)
    x = images(4, seed=3)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-4, rtol=1e-4)
    if family == "swinv2":
        assert post_layernorm_pairs(wrapped) == []  # post-norm: the fold has nothing to do
    else:
        assert len(post_layernorm_pairs(wrapped)) >= 2 * SMALL["depth"]


@pytest.mark.parametrize("method", ["minmax", "repq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_agrees_with_full_precision(family, method):
    model = small_model(family)
    config = isvit.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=16)
    quantized = isvit.quantize(model, images(16, seed=4), config, progress=False)
    x = images(32, seed=5)
    with torch.no_grad():
        assert agreement(quantized(x), model(x)) >= 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_is_refused_in_one_sentence_before_any_change(family):
    model = small_model(family)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IsvitError, match="rotation supports ViT/DeiT.* models"):
        rotate_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module", params=list(FAMILIES))
def isvit_w4a4(request):
    """The fast preset at W4/A4 (one iteration per unit): it warns that it goes without rotation."""
    family = request.param
    model = small_model(family)
    config = isvit.QuantConfig(method="isvit", preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with pytest.warns(UserWarning, match="rotation supports ViT/DeiT.* models"):
        quantized = isvit.quantize(model, images(8, seed=6), config, progress=False)
    return family, model, quantized, config


def test_isvit_fast_w4a4_gives_finite_logits(isvit_w4a4):
    _, _, quantized, _ = isvit_w4a4
    with torch.no_grad():
        logits = quantized(images(8, seed=7))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    assert all(m.input_quantizer.is_calibrated for m in quantized.modules() if isinstance(m, QuantLinear))


def test_checkpoint_reloads_bit_exact(isvit_w4a4, tmp_path):
    family, _, quantized, config = isvit_w4a4
    name, args = VARIANTS[family]
    path = tmp_path / f"{family}.safetensors"
    save_quantized(quantized, path, model_name=name, config=config, data_config={"input_size": [3, 32, 32]},
                   model_args=args)
    rebuilt, _ = load_quantized(path)
    x = images(8, seed=8)
    with torch.no_grad():
        # the head was redrawn after creation: the file carries its weights like every other
        assert torch.equal(rebuilt(x), quantized(x))


def test_onnx_export_computes_what_pytorch_computes(isvit_w4a4, tmp_path):
    family, model, quantized, config = isvit_w4a4
    name, args = VARIANTS[family]
    path = tmp_path / f"{family}.onnx"
    data_config = isvit.resolve_data_config(model, input_size=SMALL["img_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = export_onnx(quantized, path, model_name=name, config=config, data_config=data_config, model_args=args)
    # every quantized Linear and product is an integer product; only the patch embedding (on the
    # float image) is a float convolution (Swin V2's position-bias MLP is no quantized layer)
    layers = sum(isinstance(m, (QuantLinear, QuantMatMul)) for m in quantized.modules())
    assert counts["integer"] >= layers and counts["float"] == 1
    onnx_model, _ = load_onnx(path, threads=1)
    x = images(16, seed=9)
    with torch.no_grad(), folded_tables(quantized):
        expected, fp = quantized(x), model(x)
        got = onnx_model(x)
    assert got.shape == (16, 10)
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 15
    assert (got - expected).abs().mean() <= 0.5 * (expected - fp).abs().mean()


REFUSED = {
    "beit-shared-bias": ("beit_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False},
                         "shares one relative position bias among its blocks"),
    "eva-dynamic-size": ("eva02_tiny_patch14_224", {"ref_feat_shape": (4, 4), "dynamic_img_size": True},
                         "dynamic image sizes"),
    "eva-attention-pool": ("eva02_tiny_patch14_224", {"ref_feat_shape": (4, 4), "global_pool": "map"},
                           "attention pool"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_a_family_cannot_carry_is_one_sentence_before_any_change(case):
    name, extra, message = REFUSED[case]
    model = timm.create_model(name, pretrained=False, **{**SMALL, **extra}).eval()
    with pytest.raises(IsvitError, match=message):
        isvit.quantize(model, images(4, seed=1), isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8), progress=False)
    with pytest.raises(IsvitError, match=message):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (QuantLinear, QuantMatMul)) for m in model.modules())
