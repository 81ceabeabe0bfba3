"""DINOv3, the RoPE ViTs and the Perception Encoder (timm ``Eva`` models) through every method.

The three families' small random models go the way of test_families.py's EVA-02: with every
quantizer off the wrapped model is the original (through ``model(x)`` and through its units); the
post-LayerNorm fold leaves the function unchanged; minmax and repq at W8/A8 agree with full
precision on most of a batch; the isvit fast preset at W4/A4 runs, rotated; a saved checkpoint
reloads bit-exact; the ONNX export computes what PyTorch computes. DINOv3 takes dynamic image
sizes: quantized at one size it runs at another. The rotation (residual stream, v and proj per
head; not q and k, which the rotary embedding turns) leaves the full-precision function unchanged,
classifier or feature tower.
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
from isvit.modules import RMSNorm, RotatedLayerNorm, Unrotate
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm, placement_for
from isvit.rotate import is_rotated, rotate_model
from isvit.wrap import Placement, forward_units, is_block, post_layernorm_pairs, wrap_model

SIZE = 64
SMALL = {"img_size": SIZE, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
# The three families, each through every method: DINOv3 (EvaAttention without qkv bias, rotary
# embedding with 4 storage tokens unrotated, LayerScale, dynamic image sizes, average pooling);
# RoPE-Mixed (AttentionRope, a learnt rotary embedding per block, class token); the Perception
# Encoder's core (AttentionRope, norm_pre, an attention pool left float).
FAMILIES = {
    "dinov3": ("vit_small_patch16_dinov3", SMALL),
    "rope-mixed": ("vit_small_patch16_rope_mixed_224", SMALL),
    "pe-core": ("vit_pe_core_small_patch16_384", SMALL),
}
# Their other layouts, for the exact surgery and the fold: DINOv3 with q/v biases; axial RoPE, with
# an absolute position embedding too; the Perception Encoder's spatial tower (no final norm);
# AttentionRope with separate q/k/v projections, grouped-query attention (one k/v head), q/k norms
# and both sub-LayerNorms.
VARIANTS = {
    **FAMILIES,
    "dinov3-qkvb": ("vit_small_patch16_dinov3_qkvb", SMALL),
    "rope-axial": ("vit_small_patch16_rope_224", SMALL),
    "rope-ape": ("vit_small_patch16_rope_ape_224", SMALL),
    "pe-spatial": ("vit_pe_spatial_small_patch16_512", SMALL),
    "rope-gqa": ("vit_small_patch16_rope_224", {**SMALL, "qkv_fused": False, "num_kv_heads": 1, "qk_norm": True,
                                                "scale_attn_inner": True, "scale_mlp": True}),
}


def small_model(variant: str) -> torch.nn.Module:
    """A random model in which every part counts (test_families.small_model): LayerScale at 1,
    q/v, Linear and LayerNorm biases, norm weights and the prefix tokens redrawn, every Linear of
    unit gain, the head larger."""
    name, args = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            leaf = key.rsplit(".", 1)[-1]
            if leaf.startswith("gamma"):
                p.fill_(1.0)
            elif leaf in ("q_bias", "v_bias", "bias"):  # LayerNorms' too: the rotation folds them into biases
                p.normal_(0.0, 0.2)
            elif leaf in ("cls_token", "reg_token", "pos_embed"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 1 and "norm" in key and leaf == "weight":
                p.normal_(1.0, 0.2)
            elif p.dim() == 2 and leaf == "weight":
                p.normal_(0.0, p.shape[1] ** -0.5)
        model.head.weight.normal_(0.0, 0.5)
    return model


def images(n: int, seed: int, size: int | tuple[int, int] = SIZE) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def through_units(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for unit in forward_units(model):
        x = unit(x)
    return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_disabled_quantizers_give_the_original_logits(variant):
    model = small_model(variant)
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    x = images(4, seed=1)
    with torch.no_grad():
        expected = model(x)
        got, units = wrapped(x), through_units(wrapped, x)
    assert expected.std(1).min() > 0.5  # logits that differ
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(units, expected, atol=1e-5, rtol=1e-5)
    # every Linear is quantized but the attention pool's (left float), and both products of every attention
    assert not any(type(m) is torch.nn.Linear and not n.startswith("attn_pool.") for n, m in wrapped.named_modules())
    blocks = sum(is_block(unit.body) for unit in forward_units(wrapped))
    assert blocks == SMALL["depth"]
    assert sum(isinstance(m, QuantMatMul) for m in wrapped.modules()) == 2 * blocks


def test_dinov3_wrapped_runs_at_other_image_sizes_through_the_model_and_its_units():
    """The model at any size (timm's dynamic_img_size); its units at a square grid other than its own."""
    model = small_model("dinov3")
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    with torch.no_grad():
        for size in ((96, 80), 48):
            x = images(2, seed=2, size=size)
            assert torch.allclose(wrapped(x), model(x), atol=1e-5, rtol=1e-5)
        x = images(2, seed=3, size=96)
        assert torch.allclose(through_units(wrapped, x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_post_layernorm_fold_leaves_the_function_unchanged(variant):
    model = small_model(variant)
    wrapped = wrap_model(copy.deepcopy(model), placement_for(isvit.QuantConfig(method="repq", w_bits=8, a_bits=8)))
    calibrate_weights(wrapped)
    calibrate_activations(wrapped, images(8, seed=2))
    isvit.set_quantizers(wrapped, False)
    fold_post_layernorm(wrapped)
    x = images(4, seed=3)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-4, rtol=1e-4)
    # norm1 -> qkv and norm2 -> fc1 in every block, and the sub-LayerNorms where there are
    inner = 2 if variant == "rope-gqa" else 0
    assert len(post_layernorm_pairs(wrapped)) == (2 + inner) * SMALL["depth"]


@pytest.mark.parametrize("method", ["minmax", "repq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_agrees_with_full_precision(family, method):
    model = small_model(family)
    config = isvit.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=16)
    quantized = isvit.quantize(model, images(16, seed=4), config, progress=False)
    x = images(32, seed=5)
    with torch.no_grad():
        assert agreement(quantized(x), model(x)) >= 0.8


@pytest.mark.parametrize("rotate", [False, True])
def test_dinov3_quantized_at_one_size_runs_close_to_full_precision_at_another(rotate):
    model = small_model("dinov3")
    config = isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=16, rotate=rotate)
    quantized = isvit.quantize(copy.deepcopy(model), images(16, seed=4), config, progress=False)
    x = images(32, seed=5, size=(96, 80))
    with torch.no_grad():
        got, fp = quantized(x), model(x)
    assert got.shape == (32, 10) and torch.isfinite(got).all()
    assert agreement(got, fp) >= 0.8
    assert (got - fp).abs().mean() <= 0.2 * fp.std()


@pytest.fixture(scope="module", params=list(FAMILIES))
def isvit_w4a4(request):
    """The fast preset at W4/A4 (one iteration per unit), rotated as the preset does at 4 bits."""
    family = request.param
    model = small_model(family)
    config = isvit.QuantConfig(method="isvit", preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning that it goes without rotation
        quantized = isvit.quantize(model, images(8, seed=6), config, progress=False)
    assert is_rotated(quantized)
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
    save_quantized(quantized, path, model_name=name, config=config, data_config={"input_size": [3, SIZE, SIZE]},
                   model_args=args)
    rebuilt, _ = load_quantized(path)
    x = images(8, seed=8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), quantized(x))


def test_onnx_export_computes_what_pytorch_computes(isvit_w4a4, tmp_path):
    family, model, quantized, config = isvit_w4a4
    name, args = VARIANTS[family]
    path = tmp_path / f"{family}.onnx"
    data_config = isvit.resolve_data_config(model, input_size=SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = export_onnx(quantized, path, model_name=name, config=config, data_config=data_config, model_args=args)
    # every quantized Linear and product is an integer product; only the patch embedding (on the
    # float image) is a float convolution (the attention pool's Linears, and the Linear the rotation
    # makes of norm_pre's affine, are no quantized layers)
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


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------

def block_inputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, the input tokens of every block)."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in model.blocks]
    try:
        with torch.no_grad():
            return model(x), seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotation_leaves_the_full_precision_function_unchanged(variant):
    model = small_model(variant)
    rotated = copy.deepcopy(model)
    q = rotate_model(rotated, seed=0)["stream"].float()
    x = images(4, seed=1)
    before, inputs = block_inputs(model, x)
    after, rotated_inputs = block_inputs(rotated, x)
    # measured: 2e-7 to 1.3e-6 of the largest logit
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    if variant.startswith("dinov3"):  # another image size: the rotary embedding built for it
        other = images(2, seed=2, size=(96, 80))
        with torch.no_grad():
            assert (rotated(other) - model(other)).abs().max() <= 1e-4 * model(other).abs().max()
    # each block reads the stream rotated, centred first unless a reader needs its mean (no final
    # norm: the Perception Encoder's spatial tower, whose LayerNorms become RotatedLayerNorms)
    centred = variant != "pe-spatial"
    for got, t in zip(rotated_inputs, inputs):
        want = ((t - t.mean(dim=-1, keepdim=True)) if centred else t) @ q
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert not torch.allclose(rotated_inputs[-1], inputs[-1], atol=1e-2)
    norms = [m for m in rotated.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * SMALL["depth"] + centred  # norm1, norm2 and the final norm where there is one
    assert all(isinstance(n, RotatedLayerNorm) != centred for n in norms)


@pytest.mark.parametrize("variant", ["dinov3", "pe-core", "pe-spatial"])
def test_a_rotated_feature_tower_gives_the_unrotated_models_features(variant):
    """num_classes=0: the rotation undone right after the final norm (Unrotate), so the features and
    every token of forward_features are the unrotated model's."""
    name, args = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**args, "num_classes": 0}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    assert sum(isinstance(m, Unrotate) for m in rotated.modules()) == 1
    x = images(2, seed=1)
    with torch.no_grad():
        for forward in ("forward", "forward_features"):
            before, after = getattr(model, forward)(x), getattr(rotated, forward)(x)
            assert (after - before).abs().max() <= 1e-5 * before.abs().max(), forward


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_w8a8_minmax_agrees_with_full_precision(family):
    model = small_model(family)
    config = isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=16, rotate=True)
    quantized = isvit.quantize(model, images(16, seed=4), config, progress=False)
    assert is_rotated(quantized)
    x = images(32, seed=5)
    with torch.no_grad():
        assert agreement(quantized(x), model(x)) >= 0.8


def test_rotation_refuses_max_pooling_in_one_sentence_before_any_change():
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, **SMALL, global_pool="max").eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IsvitError, match="rotation needs the class token, average or attention pooling before the "
                                         "head, not 'max'"):
        rotate_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_post_norm_block_is_refused_in_one_sentence_before_any_change():
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, **SMALL, use_post_norm=True).eval()
    message = "blocks.0 is a EvaBlockPostNorm with AttentionRope; isvit supports timm's pre-norm EvaBlock"
    with pytest.raises(IsvitError, match=message):
        isvit.quantize(model, images(4, seed=1), isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8), progress=False)
    with pytest.raises(IsvitError, match=message):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (QuantLinear, QuantMatMul)) for m in model.modules())
