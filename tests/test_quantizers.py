"""Exactness of the quantizer math on hand-made tensors (isvit.quantizers).

Expected values are computed by hand or by an independent float64 re-implementation in the test,
never by calling the code under test a second time.
"""

from __future__ import annotations

import math

import pytest
import torch

import isvit
from isvit.quantizers import (
    ACTIVATION_PERCENTILES,
    SULQ_ETAS,
    WEIGHT_PERCENTILES,
    LogSqrt2Quantizer,
    SULQuantizer,
    UniformQuantizer,
    check_bits,
    fake_quant_sulq,
    outlier_channels,
    search_split_range,
    search_uniform_range,
)

from conftest import method_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def uniform(bits, scale, zero_point, **kwargs) -> UniformQuantizer:
    q = UniformQuantizer(bits, **kwargs)
    q.set_params(torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero_point, dtype=torch.float32))
    return q


def ref_fake_quant(x: torch.Tensor, scale: float, zero_point: float, bits: int) -> torch.Tensor:
    """Asymmetric uniform fake quantization in float64, written out independently."""
    x = x.double()
    code = torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)
    return (code - zero_point) * scale


# ---------------------------------------------------------------------------------------------
# UniformQuantizer
# ---------------------------------------------------------------------------------------------


def test_uniform_per_tensor_values_by_hand():
    # scale 0.5, zero point 3, 3 bits: codes 0..7 represent -1.5, -1.0, ..., 2.0
    q = uniform(3, 0.5, 3.0)
    x = torch.tensor([-1.6, 10.0, -100.0, 0.0, 0.26, 0.7, -0.9, 1.8, 2.2, -1.4])
    expected = torch.tensor([-1.5, 2.0, -1.5, 0.0, 0.5, 0.5, -1.0, 2.0, 2.0, -1.5])
    assert torch.equal(q(x), expected)
    assert q.codes(x).tolist() == [0, 7, 0, 3, 4, 4, 1, 7, 7, 0]


def test_set_params_rounds_the_zero_point():
    q = uniform(4, 0.25, 2.6)
    assert q.zero_point.tolist() == [3.0]
    assert q.scale.tolist() == [0.25]


def test_uniform_per_channel_weight_channel_dim_0():
    # 3 output channels with their own grids (4 bits: codes 0..15)
    scale = torch.tensor([0.1, 1.0, 10.0])
    zero_point = torch.tensor([0.0, 8.0, 15.0])
    q = uniform(4, scale, zero_point, per_channel=True, channel_dim=0)
    w = torch.tensor([
        [0.04, 0.26, 1.7, -0.3],     # channel 0: [0, 1.5]
        [-9.0, 3.4, 7.6, -0.6],      # channel 1: [-8, 7]
        [-70.0, 4.0, -151.0, 12.0],  # channel 2: [-150, 0]
    ])
    expected = torch.tensor([
        [0.0, 0.3, 1.5, 0.0],
        [-8.0, 3.0, 7.0, -1.0],
        [-70.0, 0.0, -150.0, 0.0],
    ])
    assert torch.allclose(q(w), expected, atol=1e-6, rtol=0)
    # each row equals the per-tensor reference with that row's grid, and no other
    for c in range(3):
        ref = ref_fake_quant(w[c], scale[c].item(), zero_point[c].item(), 4).float()
        assert torch.allclose(q(w)[c], ref, atol=1e-6, rtol=0)
    assert not torch.allclose(q(w), uniform(4, 1.0, 8.0)(w))


def test_uniform_per_channel_activation_channel_dim_last():
    torch.manual_seed(1)
    scale = torch.tensor([0.05, 0.5, 2.0, 0.01])
    zero_point = torch.tensor([3.0, 0.0, 7.0, 5.0])
    q = uniform(3, scale, zero_point, per_channel=True, channel_dim=-1)
    # 4 tokens of 4 channels: a grid laid along the tokens instead would broadcast without an error
    x = torch.randn(2, 4, 4) * torch.tensor([0.2, 2.0, 8.0, 0.05])
    out = q(x)
    assert out.shape == x.shape
    for c in range(4):
        ref = ref_fake_quant(x[..., c], scale[c].item(), zero_point[c].item(), 3).float()
        assert torch.allclose(out[..., c], ref, atol=1e-6, rtol=0)
    # ... and give other values: channel c's grid applied to token c
    along_tokens = torch.stack([ref_fake_quant(x[:, t], scale[t].item(), zero_point[t].item(), 3).float()
                                for t in range(4)], dim=1)
    assert torch.allclose(uniform(3, scale, zero_point, per_channel=True, channel_dim=1)(x), along_tokens, atol=1e-6, rtol=0)
    assert not torch.allclose(out, along_tokens, atol=1e-3)


def test_codes_range_and_consistency():
    torch.manual_seed(2)
    for bits in (2, 3, 4, 8):
        q = UniformQuantizer(bits)
        x = torch.randn(4000) * 3
        q.calibrate(x)
        codes = q.codes(x * 2)  # values beyond the range clamp at both ends
        assert codes.dtype == torch.int32
        assert codes.min().item() == 0 and codes.max().item() == 2**bits - 1
        dequant = (codes.float() - q.zero_point) * q.scale
        assert torch.allclose(dequant, q(x * 2), atol=1e-6, rtol=0)


def test_per_tensor_calibration_of_a_grid_tensor_is_exact():
    # every code of a 4-bit grid (scale 0.25, zero point 5) appears: min-max recovers the grid
    codes = torch.arange(16).repeat(40)
    codes = codes[torch.randperm(codes.numel())]
    x = (codes.float() - 5) * 0.25
    q = UniformQuantizer(4)
    q.calibrate(x)
    assert q.scale.tolist() == [0.25] and q.zero_point.tolist() == [5.0]
    assert torch.equal(q(x), x)


def test_per_channel_calibration_of_grid_tensors_is_exact():
    scales, zeros = [0.125, 1.0, 4.0], [0.0, 3.0, 7.0]
    columns = [(torch.arange(8).repeat(10)[torch.randperm(80)].float() - z) * s for s, z in zip(scales, zeros)]
    x = torch.stack(columns, dim=-1).reshape(4, 20, 3)  # channel axis last, as an activation
    q = UniformQuantizer(3, per_channel=True, channel_dim=-1)
    q.calibrate(x)
    assert q.scale.tolist() == scales and q.zero_point.tolist() == zeros
    assert torch.equal(q(x), x)


def test_percentile_candidates_include_min_max():
    assert 1.0 in ACTIVATION_PERCENTILES and 1.0 in WEIGHT_PERCENTILES
    assert len(ACTIVATION_PERCENTILES) > 1 and len(WEIGHT_PERCENTILES) > 1


def _mse_of_grid(x: torch.Tensor, scale: float, zero_point: float, bits: int) -> float:
    return (ref_fake_quant(x, scale, zero_point, bits) - x.double()).pow(2).mean().item()


def _min_max_mse(x: torch.Tensor, bits: int) -> float:
    x = x.double()
    scale = (x.max() - x.min()).item() / (2**bits - 1)
    return _mse_of_grid(x, scale, round(-x.min().item() / scale), bits)


def test_search_clips_outliers_when_that_lowers_the_mse():
    torch.manual_seed(3)
    x = torch.cat([torch.randn(10000), torch.full((10,), 20.0)])
    x = x[torch.randperm(x.numel())]
    scale, zero_point = search_uniform_range(x, 3, ACTIVATION_PERCENTILES, None)
    assert scale.shape == zero_point.shape == (1,)
    high = (2**3 - 1 - zero_point.item()) * scale.item()
    assert high < 10.0, "the outliers at 20 should have been clipped"
    chosen = _mse_of_grid(x, scale.item(), zero_point.item(), 3)
    min_max = _min_max_mse(x, 3)
    assert chosen < 0.7 * min_max


def test_search_is_never_worse_than_min_max():
    torch.manual_seed(4)
    cases = [
        torch.randn(5000),
        torch.rand(5000),
        torch.cat([torch.randn(5000), torch.tensor([1000.0, -800.0])]),  # clipping would cost more
        torch.randn(5000).exp(),
    ]
    for bits in (2, 4, 8):
        for x in cases:
            scale, zero_point = search_uniform_range(x, bits, ACTIVATION_PERCENTILES, None)
            chosen = _mse_of_grid(x, scale.item(), zero_point.item(), bits)
            assert chosen <= _min_max_mse(x, bits) * (1 + 1e-5)


def test_search_per_channel_chooses_per_channel():
    torch.manual_seed(5)
    # channel 0: Gaussian with moderate outliers (clipping wins); channel 1: a grid (min-max exact)
    ch0 = torch.cat([torch.randn(2000), torch.full((4,), 20.0)])
    ch1 = (torch.arange(8).repeat(251)[: ch0.numel()].float() - 2) * 0.5
    w = torch.stack([ch0, ch1])  # weight layout: channel axis 0
    scale, zero_point = search_uniform_range(w, 3, WEIGHT_PERCENTILES, 0)
    assert scale.shape == (2,)
    assert (7 - zero_point[0].item()) * scale[0].item() < 10.0
    assert scale[1].item() == 0.5 and zero_point[1].item() == 2.0
    for c in range(2):
        assert _mse_of_grid(w[c], scale[c].item(), zero_point[c].item(), 3) <= _min_max_mse(w[c], 3) * (1 + 1e-5)


def _tokens_with_an_outlier_channel(seed: int = 6) -> torch.Tensor:
    """(tokens, channels) activations: 16 channels of N(0, 1), channel 5 reaching 100 on a few tokens."""
    torch.manual_seed(seed)
    x = torch.randn(400, 16)
    x[:4, 5] = 100.0
    return x


def test_outlier_channels_are_found_by_their_peak_against_the_median_channel():
    x = _tokens_with_an_outlier_channel()
    assert outlier_channels(x, -1, 8.0).nonzero().flatten().tolist() == [5]
    assert not outlier_channels(torch.randn(400, 16), -1, 8.0).any()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_outlier_channels_get_a_grid_of_their_own(bits):
    x = _tokens_with_an_outlier_channel()
    scale, zero_point = search_split_range(x, bits, ACTIVATION_PERCENTILES, -1, 8.0)
    assert scale.shape == zero_point.shape == (16,)
    # the outlier channel's grid is the search over that channel alone, the others share theirs
    alone = search_uniform_range(x[:, 5], bits, ACTIVATION_PERCENTILES, None)
    rest = search_uniform_range(x[:, [c for c in range(16) if c != 5]], bits, ACTIVATION_PERCENTILES, None)
    assert (scale[5], zero_point[5]) == (alone[0], alone[1])
    others = torch.arange(16) != 5
    assert torch.equal(scale[others], rest[0].expand(15)) and torch.equal(zero_point[others], rest[1].expand(15))
    # against one grid for all: the ordinary channels keep a fine step and the total error falls
    single_scale, single_zero = search_uniform_range(x, bits, ACTIVATION_PERCENTILES, None)
    split_error = (ref_fake_quant(x, scale, zero_point, bits) - x.double()).pow(2).mean()
    single_error = (ref_fake_quant(x, single_scale, single_zero, bits) - x.double()).pow(2).mean()
    assert split_error < single_error
    assert scale[0] < single_scale[0]


def test_a_quantizer_with_outlier_ratio_calibrates_a_split_grid_and_saves_it():
    x = _tokens_with_an_outlier_channel()
    q = UniformQuantizer(4, outlier_ratio=8.0)
    q.calibrating = True
    out = q(x)
    assert q.is_per_channel and q.scale.unique().numel() == 2
    expected = ref_fake_quant(x, q.scale, q.zero_point, 4)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    restored = UniformQuantizer(4, outlier_ratio=8.0)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored(x), out)


def test_learnt_scales_leave_a_split_grid_as_it_is():
    from isvit.reconstruct import scale_parameters

    split, single = UniformQuantizer(4, outlier_ratio=8.0), UniformQuantizer(4, outlier_ratio=8.0)
    for q, x in ((split, _tokens_with_an_outlier_channel()), (single, torch.randn(400, 16))):
        q.calibrating = True
        q(x)
    assert split.is_per_channel and not single.is_per_channel
    learnt = scale_parameters(torch.nn.ModuleList([split, single]))
    assert len(learnt) == 1 and learnt[0] is single.log_scale_step
    assert getattr(split, "log_scale_step", None) is None


def test_outlier_ratio_without_outliers_is_one_grid():
    x = torch.randn(400, 16)
    q = UniformQuantizer(4, outlier_ratio=8.0)
    q.calibrating = True
    q(x)
    expected = search_uniform_range(x, 4, ACTIVATION_PERCENTILES, None)
    assert q.scale.shape == (1,) and torch.equal(q.scale, expected[0]) and torch.equal(q.zero_point, expected[1])


@pytest.mark.parametrize("ratio", [-1.0, 0.5, 1.0])
def test_quant_config_rejects_an_outlier_ratio_of_at_most_one(ratio):
    with pytest.raises(isvit.IsvitError, match="outlier_ratio"):
        isvit.RepqConfig(outlier_ratio=ratio)


def test_forward_matches_torch_fake_quantize():
    # PyTorch's own fake quantization is an independent reference for the forward values
    torch.manual_seed(6)
    x = torch.randn(1000) * 2
    q = uniform(3, 0.5, 3.0)
    assert torch.equal(q(x), torch.fake_quantize_per_tensor_affine(x, 0.5, 3, 0, 7))
    w = torch.randn(4, 50) * torch.tensor([0.1, 1.0, 3.0, 10.0])[:, None]
    scale, zero_point = torch.tensor([0.02, 0.3, 0.5, 2.0]), torch.tensor([8, 7, 3, 15], dtype=torch.int32)
    qc = uniform(4, scale, zero_point.float(), per_channel=True, channel_dim=0)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, 0, 15)
    assert torch.allclose(qc(w), ref, atol=1e-6, rtol=0)


def test_straight_through_estimator():
    q = uniform(3, 0.5, 3.0)  # codes 0..7 represent [-1.5, 2.0]
    # codes 1..6 (strictly inside the range) pass the gradient; values far outside do not
    x = torch.tensor([-1.2, -0.3, 0.1, 0.9, 1.6, 2.6, 10.0, -1.9, -50.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_straight_through_estimator_per_channel_weight():
    q = uniform(3, torch.tensor([1.0, 0.1]), torch.tensor([1.0, 6.0]), per_channel=True, channel_dim=0)
    # channel 0 represents [-1, 6], channel 1 [-0.6, 0.1]
    w = torch.tensor([[0.8, 9.0, 3.2], [0.04, -0.5, -3.0]], requires_grad=True)
    (q(w) * torch.tensor([2.0, 3.0, 5.0])).sum().backward()
    assert torch.allclose(w.grad, torch.tensor([[2.0, 0.0, 5.0], [2.0, 3.0, 0.0]]))


def test_straight_through_estimator_at_the_first_and_last_code():
    q = uniform(3, 0.5, 3.0)  # codes 0..7 represent [-1.5, 2.0]
    # -1.4 and -1.5 round to code 0, 1.9 and 2.0 to code 7: all inside [-1.5, 2.0], none clamped
    x = torch.tensor([-1.4, -1.5, 1.9, 2.0], requires_grad=True)
    q(x).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(ref, 0.5, 3, 0, 7).sum().backward()
    assert ref.grad.tolist() == [1.0, 1.0, 1.0, 1.0]  # PyTorch's STE
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_learnt_scale_gradient_matches_torch_lsq():
    # PyTorch's learnable fake quantization (LSQ) is an independent reference for d x^ / d scale;
    # values sit away from the rounding and clamping boundaries, where the two conventions agree
    x = torch.tensor([-3.1, -1.2, -0.3, 0.1, 0.9, 1.6, 2.6, 10.0, -1.9, 0.45]).repeat(5) * torch.linspace(0.9, 1.1, 50)
    weights = torch.linspace(-1, 2, 50)
    q = uniform(3, 0.5, 3.0)
    log_step = q.learnable_scale()  # the scale is learnt as scale * exp(log_step): d/d log_step = scale * d/d scale
    xa = x.clone().requires_grad_(True)
    (q(xa) * weights).sum().backward()
    s_ref = torch.tensor([0.5], requires_grad=True)
    xb = x.clone().requires_grad_(True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xb, s_ref, torch.tensor([3.0]), 0, 7, 1.0)
    (ref * weights).sum().backward()
    assert torch.allclose(q(x), ref.detach())
    assert torch.allclose(log_step.grad, 0.5 * s_ref.grad, atol=1e-5)
    assert torch.equal(xa.grad, xb.grad)


def autograd_sulq(x, eta, ymin, ymax, bits):
    """SULQ written with plain autograd ops and an add-detach straight-through estimator."""
    levels = 2**bits
    step = (ymax - ymin) / (levels - 1)
    t = (torch.log2(x + eta) - ymin) / step
    code = t + (torch.round(t) - t).detach()
    inside = (code.detach() >= 0) & (code.detach() <= levels - 1)
    code = torch.where(inside, code, code.detach().clamp(0, levels - 1))
    return torch.exp2(code * step + ymin) - eta


def autograd_log_sqrt2(x, delta, bits):
    levels = 2**bits
    t = -2 * torch.log2(x.clamp_min(1e-20) / delta)
    code = t + (torch.round(t) - t).detach()
    inside = (code.detach() >= 0) & (code.detach() <= levels - 1)
    value = delta * torch.exp2(-torch.where(inside, code, code.detach().clamp(0, levels - 1)) / 2)
    return torch.where(code.detach() > levels - 1, torch.zeros_like(value), value)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fused_softmax_quantizers_match_autograd_formulas(bits):
    # the fused forward/backward equal the same formulas written with autograd ops
    torch.manual_seed(bits)
    x = torch.softmax(torch.randn(4, 50, 50) * 3, dim=-1)
    x[0, 0, :5] = torch.tensor([0.0, 1e-30, 1.0, 0.5, 1e-6])
    weights = torch.randn_like(x)
    sulq = SULQuantizer(bits)
    sulq.calibrate(x)
    log2 = log_sqrt2(bits, delta=0.8)
    for quantizer, reference in (
        (sulq, lambda t: autograd_sulq(t, sulq.eta, sulq.ymin, sulq.ymax, bits)),
        (log2, lambda t: autograd_log_sqrt2(t, log2.delta, bits)),
    ):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, ref = quantizer(xa), reference(xb)
        (out * weights).sum().backward()
        (ref * weights).sum().backward()
        assert torch.equal(out.detach(), ref.detach())
        assert torch.equal(quantizer(x), ref.detach())  # the no-gradient path
        assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# LogSqrt2Quantizer
# ---------------------------------------------------------------------------------------------


def log_sqrt2(bits, delta=1.0) -> LogSqrt2Quantizer:
    q = LogSqrt2Quantizer(bits)
    q.delta = torch.tensor([delta])
    return q


def test_log_sqrt2_values_by_hand():
    q = log_sqrt2(3)  # codes 0..7: 2^0, 2^-0.5, ..., 2^-3.5
    x = torch.tensor([1.0, 0.5, 2**-0.5, 2**-3.5, 2**-5, 0.0, 1.5, 0.3])
    # 0.3: -2 log2(0.3) = 3.47 -> code 3 -> 2^-1.5
    expected = torch.tensor([1.0, 0.5, 2**-0.5, 2**-3.5, 0.0, 0.0, 1.0, 2**-1.5])
    assert torch.allclose(q(x), expected, atol=1e-7, rtol=1e-6)
    assert q.codes(x).tolist() == [0, 2, 1, 7, 8, 8, 0, 3]


def test_log_sqrt2_delta_scales_the_grid():
    q = log_sqrt2(4, delta=0.25)
    x = torch.tensor([0.25, 0.125, 0.25 * 2**-7.5, 0.25 * 2**-9])
    expected = torch.tensor([0.25, 0.125, 0.25 * 2**-7.5, 0.0])  # last code is 15 -> 2^-7.5
    assert torch.allclose(q(x), expected, atol=1e-9, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# SULQuantizer
# ---------------------------------------------------------------------------------------------


def softmax_of_random_logits(shape, spread=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * spread, dim=-1)


def nearest_table_distance(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The largest distance from an element of ``values`` to its nearest table entry."""
    chunks = values.reshape(-1, 1).split(100000)
    return torch.cat([(chunk - table[None]).abs().min(dim=1).values for chunk in chunks]).max()


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_sulq_table_has_2_to_the_b_distinct_levels(bits):
    x = softmax_of_random_logits((4, 3, 50, 50), seed=bits)
    q = SULQuantizer(bits)
    q.calibrate(x)
    table = q.table()
    assert table.shape == (2**bits,)
    assert table.unique().numel() == 2**bits
    assert torch.all(table[1:] > table[:-1])  # increasing with the code
    out = q(x)
    assert out.unique().numel() <= 2**bits
    assert nearest_table_distance(out, table).item() <= 1e-6  # every output is a table value
    # and the value of each element is the table entry of its code
    assert torch.allclose(out, table[q.codes(x).long()], atol=1e-6, rtol=0)


def test_sulq_uses_most_of_its_levels_on_attention_maps():
    x = softmax_of_random_logits((8, 3, 197, 197), spread=3.0, seed=10)
    q = SULQuantizer(4)
    q.calibrate(x)
    used = q(x).unique().numel()
    assert 2**3 < used <= 2**4


def test_sulq_minimum_maps_to_the_first_level():
    x = softmax_of_random_logits((4, 3, 50, 50), spread=1.0, seed=11)
    q = SULQuantizer(4)
    q.calibrate(x)
    eta = q.eta.item()
    # the first level is 2^ymin - eta = x.min(): zero and the smallest value map there
    assert q.ymin.item() == pytest.approx(math.log2(x.min().item() + eta), abs=1e-6)
    first = q.table()[0].item()
    assert first == pytest.approx(x.min().item(), abs=2e-6 * eta)
    zero = q(torch.zeros(3)).tolist()
    assert all(v == pytest.approx(first, abs=1e-9) for v in zero)
    assert q(x.max().reshape(1)).item() == pytest.approx(x.max().item(), rel=1e-5)


def test_sulq_zero_maps_to_zero_when_calibrated_with_zeros():
    logits = torch.randn(4, 3, 40, 40) * 3
    logits[..., 20:] = float("-inf")  # masked keys: exact zeros after the Softmax
    x = torch.softmax(logits, dim=-1)
    assert x.min().item() == 0.0
    for bits in (3, 4, 6):
        q = SULQuantizer(bits)
        q.calibrate(x)
        assert abs(q(torch.zeros(1)).item()) < 1e-6
        assert abs(q.table()[0].item()) < 1e-6


def test_sulq_is_monotone():
    x = softmax_of_random_logits((4, 3, 50, 50), seed=12)
    for bits in (3, 4, 6):
        q = SULQuantizer(bits)
        q.calibrate(x)
        grid = torch.linspace(0, 1, 20001)
        out = q(grid)
        assert torch.all(out[1:] >= out[:-1])
        assert out.unique().numel() == 2**bits  # the whole [0, 1] range reaches every level


def ref_sulq_mse(x: torch.Tensor, eta: float, bits: int) -> float:
    """SULQ's MSE with the calibration's grid for shift eta, in float64, written out independently."""
    x = x.double().reshape(-1)
    lo, hi = max(x.min().item(), 0.0), x.max().item()
    ymin, ymax = math.log2(lo + eta), math.log2(hi + eta)
    step = (ymax - ymin) / (2**bits - 1)
    code = torch.clamp(torch.round((torch.log2(x + eta) - ymin) / step), 0, 2**bits - 1)
    return (torch.exp2(code * step + ymin) - eta - x).pow(2).mean().item()


def test_sulq_initialisation_picks_the_mse_best_shift():
    cases = [
        (softmax_of_random_logits((4, 3, 50, 50), spread=1.0, seed=20), 4),
        (softmax_of_random_logits((4, 3, 50, 50), spread=3.0, seed=21), 3),
        (softmax_of_random_logits((4, 3, 50, 50), spread=3.0, seed=22), 6),
        (softmax_of_random_logits((4, 3, 50, 50), spread=6.0, seed=23), 4),
        (torch.rand(20000), 4),
    ]
    chosen = set()
    for x, bits in cases:
        errors = [ref_sulq_mse(x, eta, bits) for eta in SULQ_ETAS]
        best = min(range(len(errors)), key=errors.__getitem__)
        runner_up = sorted(errors)[1]
        assert runner_up > errors[best] * 1.01, "test distribution too close to a tie"
        q = SULQuantizer(bits)
        q.calibrate(x)
        assert q.eta.item() == pytest.approx(SULQ_ETAS[best], rel=1e-6), (bits, errors)
        chosen.add(SULQ_ETAS[best])
    assert len(chosen) >= 3  # the cases really exercise different shifts


def test_sulq_grid_gradients_are_the_straight_through_estimators():
    """fake_quant_sulq's gradients to x, eta, ymin and the step (the end-to-end stage's learnt grid)
    equal autograd's through the same formula with round() passed straight through where the code
    is in range and the clamped code held constant where it is not."""
    levels = 8
    x = softmax_of_random_logits((2, 3, 20, 20), spread=4.0, seed=40).requires_grad_()
    eta, ymin, step = (torch.tensor([v], requires_grad=True) for v in (0.01, -6.0, 0.7))  # codes out of range both ways
    out = fake_quant_sulq(x, eta, ymin, step, levels)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(41))
    got = torch.autograd.grad(out, (x, eta, ymin, step), upstream)
    ref_in = [t.detach().clone().requires_grad_() for t in (x, eta, ymin, step)]
    rx, reta, rymin, rstep = ref_in
    u = (torch.log2(rx + reta) - rymin) / rstep
    rounded = u.round()
    inside = (rounded >= 0) & (rounded <= levels - 1)
    assert inside.any() and (rounded < 0).any() and (rounded > levels - 1).any()
    code = torch.where(inside, u + (rounded - u).detach(), rounded.clamp(0, levels - 1).detach())
    ref = torch.exp2(code * rstep + rymin) - reta
    assert torch.allclose(out, ref, atol=1e-6)
    expected = torch.autograd.grad(ref, ref_in, upstream)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert b.abs().max() > 0


def test_sulq_under_bf16_autocast_is_float32_sulq_rounded_and_keeps_zero_at_zero():
    """In bfloat16 the grid's ymin = log2(eta) rounds (-3.3219 -> -3.3125 for eta 0.1) and the first
    level 2^ymin - eta would be 6.5e-4, not 0: every near-zero probability of an attention row would
    gain it. The quantizer computes in float32 whatever its input's dtype."""
    x = softmax_of_random_logits((2, 3, 20, 20), spread=6.0, seed=43).bfloat16()
    q = SULQuantizer(3)
    q.calibrate(torch.cat([x.float().reshape(-1), torch.zeros(1)]))
    q.eta, q.ymin = torch.tensor([0.1]), torch.log2(torch.tensor([0.1]))  # the case above: first level 0
    exact = q(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = q(x)
    assert low.dtype == torch.bfloat16 and torch.equal(low, exact.bfloat16())
    assert torch.equal(q(torch.zeros(4).bfloat16()), torch.zeros(4).bfloat16())


def test_a_learnt_sulq_grid_folds_into_its_buffers():
    x = softmax_of_random_logits((2, 3, 20, 20), spread=3.0, seed=42)
    q = SULQuantizer(3)
    q.calibrate(x)
    keys = set(q.state_dict())
    grid = q.learnable_grid()
    assert q.learnable_grid() is grid and torch.equal(q(x), SULQuantizer.quantize(q, x))
    with torch.no_grad():
        grid.copy_(torch.tensor([0.3, 0.2]))
    eta, ymin, ymax = (t.clone() for t in (q.eta, q.ymin, q.ymax))
    first = q.table()[0]
    learnt = q(x)
    assert not torch.equal(learnt, q._quantize_with(x, eta, ymin, ymax))  # the offsets are used
    q.freeze_grid()
    assert set(q.state_dict()) == keys and not list(q.parameters())
    assert torch.allclose(q.eta, eta * math.exp(0.3)) and torch.allclose(q.ymax, ymax + 0.2)
    assert q.ymin > ymin and torch.allclose(q.table()[0], first, atol=1e-7)  # the first level stays put
    assert torch.equal(q(x), learnt)
    q.freeze_grid()  # nothing learnt: nothing changes
    assert torch.equal(q(x), learnt)


# ---------------------------------------------------------------------------------------------
# Switches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: UniformQuantizer(4), lambda: LogSqrt2Quantizer(4), lambda: SULQuantizer(4)])
def test_switches(make):
    x = softmax_of_random_logits((2, 2, 10, 10), seed=30)
    q = make()
    with pytest.raises(RuntimeError, match="never calibrated"):
        q(x)
    q.enabled = False
    assert q(x) is x
    q.enabled = True
    q.calibrating = True
    out = q(x)
    assert q.calibrating is False and q.is_calibrated
    assert not torch.equal(out, x)  # it quantized, with the parameters just fitted
    state = {k: v.clone() for k, v in q.state_dict().items()}
    q(x * 0.5)  # no longer calibrating: the parameters stay
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())
    q.enabled = False
    assert q(x) is x


# ---------------------------------------------------------------------------------------------
# state_dict round trips
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_per_channel_uniform():
    w = torch.randn(6, 10) * torch.linspace(0.1, 3, 6)[:, None]
    q = UniformQuantizer(4, per_channel=True, channel_dim=0, percentiles=WEIGHT_PERCENTILES)
    q.calibrate(w)
    fresh = UniformQuantizer(4, per_channel=True, channel_dim=0, percentiles=WEIGHT_PERCENTILES)
    assert not fresh.is_calibrated
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert fresh.scale.shape == (6,)
    probe = torch.randn(6, 10) * 2
    assert torch.equal(fresh(w), q(w)) and torch.equal(fresh(probe), q(probe))


@pytest.mark.parametrize("cls", [LogSqrt2Quantizer, SULQuantizer])
def test_state_dict_round_trip_softmax_quantizers(cls):
    x = softmax_of_random_logits((2, 3, 30, 30), seed=40)
    q = cls(4)
    q.calibrate(x)
    fresh = cls(4)
    fresh.load_state_dict(q.state_dict(), strict=True)
    probe = softmax_of_random_logits((2, 3, 30, 30), spread=2.0, seed=41)
    assert torch.equal(fresh(x), q(x)) and torch.equal(fresh(probe), q(probe))


def test_per_tensor_state_loads_into_a_per_channel_quantizer():
    q = UniformQuantizer(4)
    x = torch.randn(3, 7, 16)
    q.calibrate(x)
    fresh = UniformQuantizer(4, per_channel=True, channel_dim=-1)
    fresh.load_state_dict(q.state_dict(), strict=True)
    assert fresh.scale.shape == (1,) and not fresh.is_per_channel
    assert torch.equal(fresh(x), q(x))
    # and the other way round: a per-channel state into a per-tensor quantizer
    pc = UniformQuantizer(4, per_channel=True, channel_dim=-1)
    pc.calibrate(x * torch.linspace(0.1, 5, 16))
    pt = UniformQuantizer(4)
    pt.load_state_dict(pc.state_dict(), strict=True)
    assert pt.scale.shape == (16,)
    assert torch.equal(pt(x), pc(x))


# ---------------------------------------------------------------------------------------------
# Bit-width and config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, True, "4", None])
def test_check_bits_rejects(bits):
    with pytest.raises(ValueError):
        check_bits(bits)
    for cls in (UniformQuantizer, LogSqrt2Quantizer, SULQuantizer):
        with pytest.raises(ValueError):
            cls(bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_check_bits_accepts(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("field", ["w_bits", "a_bits"])
@pytest.mark.parametrize("bits", [1, 9, 4.0])
def test_quant_config_rejects_bits(field, bits):
    with pytest.raises(isvit.IsvitError, match=field):
        method_config(**{field: bits})


def test_configs_reject_an_unknown_method_and_softmax_quantizer():
    with pytest.raises(isvit.IsvitError, match="unknown method 'gptq'"):
        isvit.config_from_dict({"method": "gptq", "w_bits": 4})
    with pytest.raises(isvit.IsvitError, match="post-Softmax"):
        isvit.RepqConfig(softmax_quantizer="log2")
    with pytest.raises(isvit.IsvitError):
        isvit.RepqConfig(calib_size=0)
    # and accepts the valid ones
    for method in isvit.METHODS:
        assert method_config(method=method, w_bits=3, a_bits=8).method == method
