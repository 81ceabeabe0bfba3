"""Model surgery (isvit.wrap): the wrapped model computes what timm computes, with every quantizer
where method.md puts it, and a quantized model survives a state_dict round trip."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import isvit
from isvit.families.swin import QuantWindowAttention
from isvit.families.vit import QuantAttention
from isvit.modules import QuantConv2d, QuantLinear, QuantMatMul
from isvit.pipeline import calibrate_activations, calibrate_weights
from isvit.quantizers import LogSqrt2Quantizer, Quantizer, SULQuantizer, UniformQuantizer
from isvit.wrap import Placement, wrap_model

from conftest import method_config, random_images, small_swin, small_vit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def vit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


def deit_distilled() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()


W4A4 = Placement(w_bits=4, a_bits=4)


# ---------------------------------------------------------------------------------------------
# The wrapped model computes the original function when its quantizers are off
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, size",
    [(vit_tiny, 224), (deit_distilled, 224), (small_swin, 64)],
    ids=["vit_tiny", "deit_tiny_distilled", "swin_small_random"],
)
def test_disabled_quantizers_give_the_original_logits(make, size):
    model = make()
    original = copy.deepcopy(model)
    x = random_images(2, size, seed=0)
    with torch.no_grad():
        expected = original(x)
        wrap_model(model, W4A4)
        isvit.set_quantizers(model, False)
        got = model(x)
    assert got.shape == expected.shape
    assert expected.std() > 1e-2  # not a degenerate all-equal output
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # sensitivity: with its quantizers calibrated and on, the same wrapped model differs
    with torch.no_grad():
        isvit.set_quantizers(model, True)
        calibrate_weights(model)
        calibrate_activations(model, x)
        assert (model(x) - expected).abs().max() > 1e-3


def test_distilled_deit_quantizes_both_heads():
    model = wrap_model(deit_distilled(), W4A4)
    assert isinstance(model.head, QuantLinear) and isinstance(model.head_dist, QuantLinear)


def test_swin_shifted_windows_pass_their_mask_through_the_wrapped_attention():
    model = small_swin()
    shifted = [b for stage in model.layers for b in stage.blocks if any(b.shift_size)]
    assert len(shifted) == 2 and all(b.attn_mask is not None for b in shifted)
    wrap_model(model, W4A4)
    isvit.set_quantizers(model, False)
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs.get("mask", args[1] if len(args) > 1 else None))

    handles = [b.attn.register_forward_pre_hook(record, with_kwargs=True) for stage in model.layers for b in stage.blocks]
    with torch.no_grad():
        model(random_images(1, 64, seed=0))
    for h in handles:
        h.remove()
    assert [m is not None for m in seen] == [False, True, False, True]
    # the mask really changes the result of a shifted block's attention
    attn = shifted[0].attn
    x = torch.randn(shifted[0].attn_mask.shape[0], 16, 32)  # one image: (windows, tokens, dim)
    with torch.no_grad():
        assert (attn(x, mask=shifted[0].attn_mask) - attn(x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Where the quantizers are
# ---------------------------------------------------------------------------------------------


def test_every_linear_and_the_patch_embed_are_quantized_vit():
    model = wrap_model(vit_tiny(), W4A4)
    assert isinstance(model.patch_embed.proj, QuantConv2d)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12 * 4 + 1
    assert all(isinstance(m, QuantLinear) for _, m in linears), [n for n, m in linears if not isinstance(m, QuantLinear)]
    for block in model.blocks:
        assert isinstance(block.attn, QuantAttention)
        assert isinstance(block.attn.qk, QuantMatMul) and isinstance(block.attn.av, QuantMatMul)
    assert not any(isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d) for m in model.modules())


def test_quantizer_count_vit_tiny():
    model = wrap_model(vit_tiny(), W4A4)
    every = isvit.quantizers(model)
    weights = isvit.quantizers(model, "weight")
    activations = isvit.quantizers(model, "activation")
    # per block: 4 Linear weights + 4 Linear inputs + 2 operands of q@k^T + 2 of attn@v;
    # then the patch-embed weight and the head's weight and input
    assert len(every) == 12 * 12 + 1 + 2 == 147
    assert len(weights) == 12 * 4 + 2 == 50
    assert len(activations) == 12 * 8 + 1 == 97
    assert sum(isinstance(q, SULQuantizer) for _, q in every) == 12
    assert sum(isinstance(q, UniformQuantizer) for _, q in every) == 135
    assert all(isinstance(q, Quantizer) for _, q in every)
    # the image (patch-embed input) stays floating point
    assert not any(n.startswith("patch_embed") for n, _ in activations)
    names = {n for n, _ in every}
    for suffix in ("attn.qkv.input_quantizer", "attn.proj.input_quantizer", "mlp.fc1.input_quantizer",
                   "mlp.fc2.input_quantizer", "attn.qk.a_quantizer", "attn.qk.b_quantizer",
                   "attn.av.a_quantizer", "attn.av.b_quantizer", "attn.qkv.weight_quantizer"):
        assert f"blocks.11.{suffix}" in names
    assert {"patch_embed.proj.weight_quantizer", "head.weight_quantizer", "head.input_quantizer"} <= names
    with pytest.raises(ValueError, match="kind must be"):
        isvit.quantizers(model, "activations")


def test_every_linear_is_quantized_swin():
    model = wrap_model(small_swin(), W4A4)
    assert isinstance(model.patch_embed.proj, QuantConv2d)
    assert isinstance(model.layers[1].downsample.reduction, QuantLinear)
    assert isinstance(model.layers[1].downsample.reduction.input_quantizer, UniformQuantizer)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 4 + 1 + 1 and all(isinstance(m, QuantLinear) for m in linears)
    assert all(isinstance(b.attn, QuantWindowAttention) for stage in model.layers for b in stage.blocks)
    assert len(isvit.quantizers(model)) == 4 * 12 + 1 + 2 + 2


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("make, size", [(lambda: small_vit(), 64), (small_swin, 64)], ids=["vit", "swin"])
def test_post_layernorm_granularity_after_calibration(make, size, per_channel):
    model = wrap_model(make(), Placement(w_bits=4, a_bits=4, post_ln_per_channel=per_channel))
    calibrate_weights(model)
    calibrate_activations(model, random_images(2, size, seed=0))
    blocks = model.blocks if hasattr(model, "blocks") else [b for stage in model.layers for b in stage.blocks]
    for block in blocks:
        dim = block.norm1.normalized_shape[0]
        for linear in (block.attn.qkv, block.mlp.fc1):
            q = linear.input_quantizer
            assert q.is_per_channel == per_channel
            assert q.scale.numel() == (dim if per_channel else 1)
        for q in (block.attn.proj.input_quantizer, block.mlp.fc2.input_quantizer, block.attn.qk.a_quantizer,
                  block.attn.qk.b_quantizer, block.attn.av.b_quantizer):
            assert q.scale.numel() == 1
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert linear.weight_quantizer.scale.numel() == linear.out_features  # per output channel
    head = model.head if isinstance(model.head, QuantLinear) else model.head.fc
    assert head.input_quantizer.scale.numel() == 1


@pytest.mark.parametrize(
    "kind, cls", [("sulq", SULQuantizer), ("log2sqrt2", LogSqrt2Quantizer), ("uniform", UniformQuantizer)]
)
def test_softmax_quantizer_follows_placement(kind, cls):
    for model in (small_vit(), small_swin()):
        wrap_model(model, Placement(w_bits=4, a_bits=4, softmax_quantizer=kind))
        blocks = model.blocks if hasattr(model, "blocks") else [b for stage in model.layers for b in stage.blocks]
        assert all(type(b.attn.av.a_quantizer) is cls for b in blocks)
        assert all(type(b.attn.av.b_quantizer) is UniformQuantizer for b in blocks)


# ---------------------------------------------------------------------------------------------
# timm's attention-mask arguments
# ---------------------------------------------------------------------------------------------


def test_wrapped_attention_accepts_attn_mask():
    model = small_vit()
    original = copy.deepcopy(model.blocks[0].attn)
    wrap_model(model, W4A4)
    isvit.set_quantizers(model, False)
    attn = model.blocks[0].attn
    B, N, C = 2, 17, 192
    x = torch.randn(B, N, C)
    bool_mask = torch.rand(B, 1, N, N) > 0.4
    bool_mask |= torch.eye(N, dtype=torch.bool)  # every query attends to at least itself
    float_mask = torch.randn(B, 1, N, N) * 3
    float_mask[:, :, :, 5:9] = -1e4
    with torch.no_grad():
        unmasked = original(x)
        for kwargs in ({"attn_mask": bool_mask}, {"attn_mask": float_mask}, {"attn_mask": bool_mask[0, 0]},
                       {"is_causal": True}, {}):
            expected = original(x, **kwargs)
            assert torch.allclose(attn(x, **kwargs), expected, atol=1e-5, rtol=1e-5), kwargs
            if kwargs:
                assert (expected - unmasked).abs().max() > 1e-3, kwargs  # the mask matters


# ---------------------------------------------------------------------------------------------
# state_dict round trip of a quantized model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["repq", "minmax"])
def test_quantized_state_dict_loads_into_a_fresh_wrap(method):
    calib = random_images(8, 64, seed=1)
    config = method_config(method=method, w_bits=4, a_bits=4, calib_size=8)
    quantized = isvit.quantize(small_vit(seed=0), calib, config, progress=False)
    placement = Placement(
        w_bits=4, a_bits=4, softmax_quantizer=config.softmax_quantizer,
        post_ln_per_channel=method == "repq",
    )
    fresh = wrap_model(small_vit(seed=123), placement)  # other random weights, uncalibrated quantizers
    x = random_images(4, 64, seed=2)
    with torch.no_grad():
        expected = quantized(x)
        fresh.load_state_dict(quantized.state_dict(), strict=True)
        got = fresh(x)
    assert torch.equal(got, expected)
    if method == "repq":
        # the post-LayerNorm quantizers were folded per tensor; the fresh per-channel wrap adopted that
        for block in fresh.blocks:
            assert block.attn.qkv.input_quantizer.scale.shape == (1,)
            assert block.mlp.fc1.input_quantizer.scale.shape == (1,)
    # and the fresh model really changed by loading (it had other weights and no calibration)
    isvit.set_quantizers(fresh, False)
    with torch.no_grad():
        assert (fresh(x) - expected).abs().max() > 1e-4


def _swin_round_trip(config: isvit.RepqConfig) -> None:
    calib = random_images(4, 64, seed=3)
    quantized = isvit.quantize(small_swin(0), calib, config, progress=False)
    fresh = wrap_model(small_swin(7), Placement(w_bits=4, a_bits=4, softmax_quantizer=config.softmax_quantizer))
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    x = random_images(2, 64, seed=4)
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


def test_quantized_swin_state_dict_round_trip_without_bias_correction():
    _swin_round_trip(isvit.RepqConfig(w_bits=4, a_bits=4, calib_size=4, bias_correction=False))


def test_quantized_swin_state_dict_round_trip_with_bias_correction():
    _swin_round_trip(isvit.RepqConfig(w_bits=4, a_bits=4, calib_size=4))


def test_quantized_vit_without_qkv_bias_state_dict_round_trip():
    config = isvit.RepqConfig(w_bits=4, a_bits=4, calib_size=4, bias_correction=False)
    quantized = isvit.quantize(small_vit(seed=0, qkv_bias=False), random_images(4, 64, seed=5), config, progress=False)
    fresh = wrap_model(small_vit(seed=1, qkv_bias=False), Placement(w_bits=4, a_bits=4, softmax_quantizer="log2sqrt2"))
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    x = random_images(2, 64, seed=6)
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def test_unsupported_model_is_refused():
    resnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(isvit.IsvitError, match="ResNet"):
        wrap_model(resnet, W4A4)
    with pytest.raises(isvit.IsvitError):
        isvit.quantize(resnet, random_images(2, 32, seed=0), isvit.MinmaxConfig(calib_size=2), progress=False)
    assert not any(isinstance(m, Quantizer) for m in resnet.modules())
    # before any other work: the (empty) calibration data is not even looked at
    with pytest.raises(isvit.IsvitError, match="not ResNet"):
        isvit.quantize(resnet, [], isvit.IsvitConfig(), progress=False)


def test_a_vit_with_a_swiglu_sub_norm_is_refused_in_one_sentence_before_any_change():
    from timm.layers import SwiGLU

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10, mlp_layer=SwiGLU, scale_mlp_norm=True)
    with pytest.raises(isvit.IsvitError, match="blocks.0.mlp.norm is a LayerNorm"):
        wrap_model(model, W4A4)
    assert not any(isinstance(m, (Quantizer, QuantLinear)) for m in model.modules())
    config = isvit.MinmaxConfig(w_bits=8, a_bits=8, calib_size=2)
    with pytest.raises(isvit.IsvitError, match="SwiGLU"):
        isvit.quantize(model, random_images(2, 32, seed=0), config, progress=False)


def test_wrapping_twice_is_refused():
    model = wrap_model(small_vit(), W4A4)
    count = len(isvit.quantizers(model))
    with pytest.raises(isvit.IsvitError, match="already quantized"):
        wrap_model(model, W4A4)
    assert len(isvit.quantizers(model)) == count
    quantized = isvit.quantize(small_vit(), random_images(2, 64, seed=0), isvit.MinmaxConfig(calib_size=2), progress=False)
    with pytest.raises(isvit.IsvitError):
        isvit.quantize(quantized, random_images(2, 64, seed=0), isvit.MinmaxConfig(calib_size=2), progress=False)
