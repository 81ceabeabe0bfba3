"""GPTQ rounding: on the grid, equal to round-to-nearest without input correlation, better than
it with correlation, and wired into stage 3 of isvit."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import isvit
from isvit.config import IsvitConfig, MinmaxConfig
from isvit.gptq import _as_rows, gptq_round, gptq_unit
from isvit.pipeline import (
    calibrate_activations,
    calibrate_weights,
    fold_post_layernorm,
    set_quantizers,
)
from isvit.quantizers import UniformQuantizer, fake_quant_uniform
from isvit.reconstruct import reconstruction_loss
from isvit.wrap import forward_units, wrap_model

from conftest import random_images, small_swin, small_vit, unit_data


def grid(weight, bits):
    q = UniformQuantizer(bits, per_channel=True, channel_dim=0)
    q.calibrate(weight)
    return q


def correlated_inputs(n=2000, d=48, seed=0):
    """Inputs whose features are strongly correlated (a few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) @ torch.randn(4, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_puts_every_weight_on_its_rows_grid(bits):
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    x = correlated_inputs()
    q = grid(w, bits)
    out, latent = gptq_round(w, x.T @ x, q.scale, q.zero_point, q.levels)
    codes = out / q.scale[:, None] + q.zero_point[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= 0 and codes.round().max() <= q.levels - 1
    assert torch.equal(fake_quant_uniform(out, q.scale[:, None], q.zero_point[:, None], q.levels), out)
    # the latent weights round to the same codes and stay inside the grid's range
    assert torch.equal(fake_quant_uniform(latent, q.scale[:, None], q.zero_point[:, None], q.levels), out)
    codes = latent / q.scale[:, None] + q.zero_point[:, None]
    assert codes.min() >= -1e-4 and codes.max() <= q.levels - 1 + 1e-4
    assert not torch.equal(latent, out)


def test_gptq_without_input_correlation_is_round_to_nearest():
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    q = grid(w, 3)
    hessian = torch.diag(torch.rand(48, generator=torch.Generator().manual_seed(3)) + 0.5)
    nearest = fake_quant_uniform(w, q.scale[:, None], q.zero_point[:, None], q.levels)
    rounded, latent = gptq_round(w, hessian, q.scale, q.zero_point, q.levels)
    assert torch.equal(rounded, nearest)
    assert torch.allclose(latent, w.clamp(min=(-q.zero_point * q.scale)[:, None], max=((q.levels - 1 - q.zero_point) * q.scale)[:, None]))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_error_is_lower_than_round_to_nearest(bits):
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs()
    q = grid(w, bits)
    nearest = fake_quant_uniform(w, q.scale[:, None], q.zero_point[:, None], q.levels)
    rounded, _ = gptq_round(w, x.T @ x, q.scale, q.zero_point, q.levels, block_size=16)  # several blocks
    error = lambda v: (x @ (v - w).T).pow(2).mean().item()
    assert error(rounded) < 0.5 * error(nearest), (error(rounded), error(nearest))


def test_conv_rows_are_what_its_weight_multiplies():
    model = isvit.quantize(small_vit(), random_images(8), MinmaxConfig(w_bits=8, a_bits=8), progress=False)
    conv = model.patch_embed.proj
    x = random_images(2)
    rows = _as_rows(conv, x)
    expected = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)  # (N, out, h, w)
    expected = expected.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    assert torch.allclose(rows @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias, expected, atol=1e-4)


# Random Swin blocks barely correlate their inputs' features, so GPTQ has little to gain there:
# measured loss ratio 1.0005 (first block) and 0.9999 (second), so it must stay within 1%; the
# random ViT block's loss must drop (measured 0.958).
@pytest.mark.parametrize("make, ratio", [(small_vit, 0.97), (small_swin, 1.01)])
def test_gptq_unit_rounds_every_weight_and_lowers_the_unit_loss(make, ratio):
    x = random_images(48)
    model = make()
    fp = copy.deepcopy(model)
    q = wrap_model(model, IsvitConfig(w_bits=3, a_bits=8).placement())
    set_quantizers(q, False, "weight")
    calibrate_activations(q, x)
    fold_post_layernorm(q)
    set_quantizers(q, True, "weight")
    calibrate_weights(q)
    unit, inputs, targets = unit_data(fp, q, x, 1, sequential=True)
    before = reconstruction_loss(unit, inputs, targets, "cpu")
    layers = [m for m in unit.modules() if hasattr(m, "weight_quantizer")]
    nearest = [layer.weight_quantizer.codes(layer.weight) for layer in layers]
    assert gptq_unit(unit, inputs, "cpu") == 4  # qkv, proj, fc1, fc2
    after = reconstruction_loss(unit, inputs, targets, "cpu")
    assert after < ratio * before, (before, after)
    for layer, codes in zip(layers, nearest):  # every layer's rounding moved off round-to-nearest
        assert (layer.weight_quantizer.codes(layer.weight) != codes).float().mean() > 0.01
    for layer in (m for m in unit.modules() if hasattr(m, "weight_quantizer")):
        wq = layer.weight_quantizer
        codes = layer.weight / wq.scale[:, None] + wq.zero_point[:, None]  # latent weights inside the grid's range
        assert codes.min() >= -1e-3 and codes.max() <= wq.levels - 1 + 1e-3


def test_isvit_runs_gptq_in_stage3_only_when_asked(monkeypatch):
    calls = []
    from isvit import pipeline

    def counting(unit, *args, **kwargs):
        calls.append(unit.name)
        return 0

    monkeypatch.setattr(pipeline, "gptq_unit", counting)
    config = IsvitConfig.from_preset(w_bits=4, a_bits=4, iters=2, batch_size=8, calib_size=16)
    isvit.quantize(small_vit(), random_images(16), config, progress=False)
    assert calls == []  # off by default: the paper's round-to-nearest start
    isvit.quantize(small_vit(), random_images(16), dataclasses.replace(config, gptq=True), progress=False)
    assert calls == [u.name for u in forward_units(wrap_model(small_vit(), config.placement()))]
