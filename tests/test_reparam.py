"""The per-channel -> per-tensor reparameterisation of post-LayerNorm quantizers (RepQ-ViT, SOS
stage 2): it must change neither the full-precision function nor, with an integer target zero
point, the quantized one (method.md)."""

from __future__ import annotations

import copy

import pytest
import torch

import isvit
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm
from isvit.quantizers import UniformQuantizer
from isvit.reparam import reparameterize_layernorm
from isvit.wrap import Placement, post_layernorm_pairs, wrap_model

from conftest import calibrated, logits, random_images, small_swin, small_vit


@pytest.fixture(scope="module")
def vit():
    """A small random ViT, wrapped per channel and calibrated; tests work on deep copies."""
    torch.manual_seed(0)
    return calibrated(small_vit(seed=0))


@pytest.fixture
def model(vit):
    return copy.deepcopy(vit)


def block_input(model, x, index: int = 0) -> torch.Tensor:
    """The input tokens of block ``index`` (captured during a full-precision forward); leaves every
    quantizer enabled."""
    captured = []
    handle = model.blocks[index].register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    logits(model, x, "none")
    handle.remove()
    isvit.set_quantizers(model, True)
    return captured[0]


def test_the_calibrated_post_layernorm_grids_really_differ_per_channel(vit):
    for _, _, linear in post_layernorm_pairs(vit):
        q = linear.input_quantizer
        assert q.is_per_channel
        assert q.scale.max() > 4 * q.scale.min()
        assert q.zero_point.max() - q.zero_point.min() >= 8


def test_fold_keeps_the_full_precision_function(model):
    x = random_images(8, seed=2)
    before = logits(model, x, "none")
    fold_post_layernorm(model)
    after = logits(model, x, "none")
    assert before.abs().max() > 0.1
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)


def test_fold_keeps_the_quantized_function(model):
    x = random_images(8, seed=2)
    reference = logits(model, x, "none")
    before = logits(model, x, "activation")
    assert (before - reference).abs().max() > 1e-2  # the activation quantization does matter here
    fold_post_layernorm(model)
    after = logits(model, x, "activation")
    tolerance = 1e-4 * before.abs().max().item()
    assert (after - before).abs().max().item() <= tolerance
    for _, _, linear in post_layernorm_pairs(model):
        q = linear.input_quantizer
        assert q.scale.shape == (1,) and not q.is_per_channel


@pytest.mark.parametrize("pair", [0, 1, 3], ids=["blocks.0.norm1-qkv", "blocks.0.norm2-fc1", "blocks.1.norm2-fc1"])
def test_fold_keeps_every_integer_code(model, pair):
    _, norm, linear = post_layernorm_pairs(model)[pair]
    # realistic tokens (for norm2 the block input stands in for the mid-block residual stream)
    tokens = block_input(model, random_images(8, seed=3), index=pair // 2)
    q = linear.input_quantizer
    d, z = q.scale.clone(), q.zero_point.clone()
    weight = linear.weight.detach().clone()
    with torch.no_grad():
        codes_before = q.codes(norm(tokens))
        isvit.set_quantizers(model, False)
        fp_before = linear(norm(tokens))
        reparameterize_layernorm(norm, linear)
        codes_after = q.codes(norm(tokens))
        fp_after = linear(norm(tokens))
    # the new grid: per tensor, d' = mean(d), an integer z' = round(mean(z))
    assert q.scale.shape == q.zero_point.shape == (1,)
    assert q.scale.item() == pytest.approx(d.mean().item(), rel=1e-6)
    assert q.zero_point.item() == torch.round(z.mean()).item()
    assert q.zero_point.item() == int(q.zero_point.item())
    assert torch.allclose(linear.weight, weight * (d / d.mean()), rtol=1e-6, atol=1e-7)
    # every code of the post-LayerNorm activation is the same, up to rare float ties
    assert codes_before.shape == codes_after.shape and codes_before.numel() > 10000
    assert codes_before.unique().numel() > 8  # a real spread of codes, not all clamped
    mismatch = (codes_before != codes_after).float().mean().item()
    assert mismatch < 1e-4
    # and the pair's full-precision output is unchanged
    assert torch.allclose(fp_after, fp_before, atol=1e-4, rtol=1e-4)


def fold_by_hand(norm, linear, round_zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """method.md's fold written out; ``round_zero_point=False`` is the authors' z' = mean(z).

    The buffers are set directly, since ``set_params`` would round the zero point. Returns (r, b):
    a folded activation x' corresponds to x = (x' + b) * r in the original domain.
    """
    q = linear.input_quantizer
    d, z = q.scale.clone(), q.zero_point.clone()
    d_new = d.mean()
    z_new = torch.round(z.mean()) if round_zero_point else z.mean()
    r = d / d_new
    b = (z_new - z) * d_new
    with torch.no_grad():
        norm.weight.copy_(norm.weight / r)
        norm.bias.copy_(norm.bias / r - b)
        linear.weight.copy_(linear.weight * r)
        linear.bias.copy_(linear.bias + linear.weight @ b)
    q.scale, q.zero_point = d_new.reshape(1), z_new.reshape(1)
    return r, b


@pytest.mark.parametrize("round_zero_point", [True, False], ids=["integer-z", "fractional-z"])
def test_dequantized_activation_mapped_back(model, round_zero_point):
    """Pair level: the folded quantizer's output, mapped back to the original domain, equals the
    per-channel quantizer's output exactly with an integer z', and not with the authors' mean(z)."""
    _, norm, linear = post_layernorm_pairs(model)[0]
    tokens = block_input(model, random_images(8, seed=3))
    q = linear.input_quantizer
    with torch.no_grad():
        before = q(norm(tokens))
        r, b = fold_by_hand(norm, linear, round_zero_point)
        after = (q(norm(tokens)) + b) * r
    differs = ~torch.isclose(after, before, rtol=1e-4, atol=1e-5)
    if round_zero_point:
        assert differs.float().mean().item() < 1e-4
    else:
        assert differs.float().mean().item() > 0.05


def test_a_fractional_target_zero_point_changes_the_quantized_function(model):
    """The sensitivity of the model-level checks: the authors' z' = mean(z) keeps the full-precision
    function but not the quantized one, and the same tolerance as above sees it."""
    pairs = post_layernorm_pairs(model)
    assert all(p[2].input_quantizer.zero_point.mean().item() % 1 != 0 for p in pairs)
    x = random_images(8, seed=2)
    fp_before, q_before = logits(model, x, "none"), logits(model, x, "activation")
    for _, norm, linear in pairs:
        fold_by_hand(norm, linear, round_zero_point=False)
    fp_after, q_after = logits(model, x, "none"), logits(model, x, "activation")
    assert torch.allclose(fp_after, fp_before, atol=1e-5, rtol=1e-5)  # the float function is kept
    tolerance = 1e-4 * q_before.abs().max().item()
    assert (q_after - q_before).abs().max().item() > 100 * tolerance


def test_the_fold_by_hand_with_an_integer_zero_point_agrees_with_isvit(model):
    """The hand-written fold of the test above is method.md's fold: with z' rounded it gives the
    same parameters as isvit's."""
    reference = copy.deepcopy(model)
    for _, norm, linear in post_layernorm_pairs(reference):
        fold_by_hand(norm, linear, round_zero_point=True)
    fold_post_layernorm(model)
    for (_, n1, l1), (_, n2, l2) in zip(post_layernorm_pairs(model), post_layernorm_pairs(reference)):
        for a, b in ((n1.weight, n2.weight), (n1.bias, n2.bias), (l1.weight, l2.weight), (l1.bias, l2.bias),
                     (l1.input_quantizer.scale, l2.input_quantizer.scale),
                     (l1.input_quantizer.zero_point, l2.input_quantizer.zero_point)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fold_resets_only_the_folded_weight_quantizers(model):
    fold_post_layernorm(model)
    folded = {id(linear.weight_quantizer) for _, _, linear in post_layernorm_pairs(model)}
    for name, q in isvit.quantizers(model, "weight"):
        assert q.is_calibrated == (id(q) not in folded), name
    calibrate_weights(model, only_uncalibrated=True)
    for _, _, linear in post_layernorm_pairs(model):
        assert linear.weight_quantizer.scale.numel() == linear.out_features


def test_fold_refuses_a_per_tensor_quantizer():
    model = wrap_model(small_vit(), Placement(w_bits=4, a_bits=4, post_ln_per_channel=False))
    calibrate_weights(model)
    calibrate_activations(model, random_images(2, seed=0))
    _, norm, linear = post_layernorm_pairs(model)[0]
    with pytest.raises(ValueError):
        reparameterize_layernorm(norm, linear)
    assert isinstance(linear.input_quantizer, UniformQuantizer)


# ---------------------------------------------------------------------------------------------
# Swin
# ---------------------------------------------------------------------------------------------


def _swin_fold_changes(window_size: int) -> tuple[float, float, float]:
    model = calibrated(small_swin(window_size=window_size))
    x = random_images(8, seed=2)
    fp_before, q_before = logits(model, x, "none"), logits(model, x, "activation")
    fold_post_layernorm(model)
    fp_after, q_after = logits(model, x, "none"), logits(model, x, "activation")
    scale = fp_before.abs().max().item()
    return (fp_after - fp_before).abs().max().item() / scale, (q_after - q_before).abs().max().item() / scale, scale


def test_fold_is_exact_on_swin():
    # 16x16 and 8x8 tokens in windows of 4: no padding
    fp_change, q_change, scale = _swin_fold_changes(window_size=4)
    assert scale > 0.05
    assert fp_change < 1e-4 and q_change < 1e-4


def test_fold_is_exact_on_a_padded_swin():
    fp_change, q_change, _ = _swin_fold_changes(window_size=6)
    assert fp_change < 1e-4 and q_change < 1e-4


def test_padded_swin_keeps_qkv_per_channel_and_folds_fc1():
    # timm pads the post-LayerNorm tokens of such blocks with zeros, which the fold's shift would
    # not reach: their (norm1, qkv) pair is left per channel, everything else is folded.
    model = calibrated(small_swin(window_size=6))
    fold_post_layernorm(model)
    for block in (b for stage in model.layers for b in stage.blocks):
        assert block.attn.qkv.input_quantizer.is_per_channel
        assert not block.mlp.fc1.input_quantizer.is_per_channel
