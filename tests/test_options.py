"""The options of the block reconstruction for low bits (issue 10): learnt rounding (AdaRound and
rounding offsets), learnt activation step sizes, the Fisher-weighted loss and low activation
percentiles. Each must end where it claims (exact codes, finite positive weights) and lower its
unit's reconstruction loss on the small random ViT and Swin."""

import pytest
import torch

import isvit
from isvit.checkpoint import load_quantized, save_quantized
from isvit.config import EndToEnd, IsvitConfig, Reconstruction, activation_percentiles
from isvit.pipeline import calibrate_weights, fold_post_layernorm, set_quantizers
from isvit.quantizers import ACTIVATION_PERCENTILES, UniformQuantizer, named_quantizers
from isvit.reconstruct import (
    output_importance,
    reconstruct_unit,
    reconstruction_loss,
    rounded_layers,
    rounding_beta,
    token_errors,
)
from isvit.wrap import forward_units, wrap_model

from conftest import (
    SMALL_SWIN,
    SMALL_VIT,
    activations_quantized,
    method_config,
    random_images,
    small_swin,
    small_vit,
    unit_data,
)


def stage3_unit(make, bits=3, index=1):
    """A unit of ``make()`` ready for stage 3 (folded, weights calibrated) with its quantized inputs
    and full-precision targets."""
    x = random_images(48)
    fp, q = activations_quantized(make(), x, bits)
    fold_post_layernorm(q)
    set_quantizers(q, True, "weight")
    calibrate_weights(q)
    unit, inputs, targets = unit_data(fp, q, x, index, sequential=True)
    return fp, q, unit, inputs, targets


def on_grid(module) -> bool:
    """The layer's float weight is exactly one of its quantizer's grid values."""
    w = module.weight.detach()
    return torch.equal(module.weight_quantizer(w), w)


# ---------------------------------------------------------------------------------------------
# Learnt rounding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["adaround", "offset"])
def test_learnt_rounding_starts_where_the_weight_is(mode):
    torch.manual_seed(0)
    q = UniformQuantizer(3, per_channel=True, channel_dim=0)
    weight = torch.randn(6, 10)
    q.calibrate(weight)
    q.start_learnt_rounding(weight, mode)
    if mode == "adaround":  # soft: the float weight itself, clamped to the grid's range
        low = (0 - q.zero_point[:, None]) * q.scale[:, None]
        high = (q.levels - 1 - q.zero_point[:, None]) * q.scale[:, None]
        assert torch.allclose(q(weight), torch.minimum(torch.maximum(weight, low), high), atol=1e-5)
    else:  # offset 0: round to nearest
        q_plain = UniformQuantizer(3, per_channel=True, channel_dim=0)
        q_plain.set_params(q.scale, q.zero_point)
        assert torch.equal(q(weight), q_plain(weight))


@pytest.mark.parametrize("mode", ["adaround", "offset"])
def test_learnt_rounding_moves_each_weight_by_at_most_one_code(mode):
    torch.manual_seed(0)
    q = UniformQuantizer(3, per_channel=True, channel_dim=0)
    weight = torch.nn.Parameter(torch.randn(6, 10))
    q.calibrate(weight.detach())
    nearest = q.codes(weight.detach())
    v = q.start_learnt_rounding(weight, mode)
    with torch.no_grad():
        v.copy_(torch.randn_like(v) * 5)  # anywhere
    q.finish_learnt_rounding(weight)
    assert not q.learning_rounding
    codes = q.codes(weight.detach())
    assert (codes - nearest).abs().max() <= 1
    assert torch.equal(q(weight.detach()), weight.detach())


def test_offsets_of_limit_one_move_a_weight_on_its_grid_one_code_at_a_learnt_step():
    """The end-to-end stage's offsets: a weight already on its grid moves one code up or down (at
    most), on the grid of the step size learnt beside them, which the fold then keeps."""
    torch.manual_seed(0)
    q = UniformQuantizer(3, per_channel=True, channel_dim=0)
    weight = torch.nn.Parameter(torch.randn(6, 10))
    q.calibrate(weight.detach())
    with torch.no_grad():
        weight.copy_(q(weight))  # on the grid, as the block stages leave it
    codes = q.codes(weight.detach())
    step = q.learnable_scale()
    v = q.start_learnt_rounding(weight, "offset", limit=1.0)
    assert torch.equal(q(weight), weight.detach())  # started where it was
    with torch.no_grad():
        v.copy_(torch.randn_like(v) * 5)
        step.fill_(0.05)
    out = q(weight)
    out.sum().backward()
    assert v.grad is not None and step.grad is not None  # both trained through one forward
    q.finish_learnt_rounding(weight)
    q.freeze_scale()
    assert torch.equal(q(weight.detach()), weight.detach()) and torch.allclose(weight, out)
    moved = q.codes(weight.detach()) - codes
    assert moved.abs().max() <= 1  # |codes / 1.05 - codes| < 0.4 and the offset at most 1: one code
    assert (moved != 0).float().mean() > 0.3


def test_the_adaround_regulariser_vanishes_on_hard_decisions_and_anneals():
    q = UniformQuantizer(3)
    q.rounding_mode = "adaround"
    q.rounding = torch.nn.Parameter(torch.tensor([-10.0, 10.0, 0.0]))
    assert q.soft_rounding().tolist() == [0.0, 1.0, 0.5]
    assert q.rounding_regulariser(2.0).item() == pytest.approx(1.0)  # only the undecided one counts
    settings = Reconstruction(iters=100, round_warmup=0.2, round_beta=(20.0, 2.0))
    assert rounding_beta(10, settings) is None  # warm-up: no regulariser
    assert rounding_beta(20, settings) == pytest.approx(20.0)
    assert rounding_beta(99, settings) == pytest.approx(2.0)
    betas = [rounding_beta(s, settings) for s in range(20, 100)]
    assert betas == sorted(betas, reverse=True)


@pytest.mark.parametrize("make", [small_vit, small_swin])
@pytest.mark.parametrize("mode, lr", [("adaround", 0.1), ("offset", 0.05)])
def test_learnt_rounding_lowers_the_loss_and_ends_on_the_grid(make, mode, lr):
    _, _, unit, inputs, targets = stage3_unit(make)
    latent = {id(m): m.weight.detach().clone() for m in rounded_layers(unit)}
    before = reconstruction_loss(unit, inputs, targets, "cpu")
    settings = Reconstruction(iters=60, batch_size=16, lr=1e-4, rounding=mode, round_lr=lr, round_reg=1.0)
    reconstruct_unit(unit, inputs, targets, settings, "cpu", progress=False)
    after = reconstruction_loss(unit, inputs, targets, "cpu")
    assert after < 0.95 * before, (before, after)
    layers = rounded_layers(unit)
    assert layers and all(on_grid(m) for m in layers)
    assert not any(m.weight_quantizer.learning_rounding for m in layers)
    for m in layers:  # each weight went to the code below or above its latent value, nowhere else
        wq = m.weight_quantizer
        scale, zero = wq._broadcast(wq.scale, m.weight), wq._broadcast(wq.zero_point, m.weight)
        below = (torch.floor(latent[id(m)] / scale) + zero).clamp(0, wq.levels - 1)
        above = (torch.floor(latent[id(m)] / scale) + 1 + zero).clamp(0, wq.levels - 1)
        codes = wq.codes(m.weight.detach()).float()
        assert ((codes == below) | (codes == above)).all()
    assert not any(name.endswith("rounding") for name, _ in unit.named_parameters())


@pytest.mark.parametrize("rounding", ["adaround", "offset"])
def test_a_unit_put_back_after_learnt_rounding_also_ends_on_its_grid(rounding):
    # at learning rate 10 every unit ends worse than it started and is put back as it was (the block
    # stages alone: the end-to-end stage after them moves the step sizes under the weights)
    config = IsvitConfig.from_preset(w_bits=3, a_bits=3, preset="fast", iters=3, calib_size=16, lr=10.0,
                         rounding=rounding, round_lr=10.0, stage1=False, rotate=False, end_to_end=EndToEnd())
    qmodel = isvit.quantize(small_vit(), random_images(16), config, progress=False)
    layers = [m for m in qmodel.modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.enabled]
    assert layers and all(on_grid(m) for m in layers)


@pytest.mark.parametrize("spec, make", [(SMALL_VIT, small_vit), (SMALL_SWIN, small_swin)])
@pytest.mark.parametrize("fields, rounding", [
    ({"rounding": "adaround", "round_lr": 0.1}, "adaround"),
    ({}, "offset"),  # the fast preset's own at 3 bits
])
def test_learnt_rounding_is_saved_as_its_codes_and_reloads_exactly(tmp_path, spec, make, fields, rounding):
    model = make()
    x = random_images(32)
    # the block stages alone: the end-to-end stage moves the step sizes under the weights
    # (test_endtoend.py: a model after it reloads to the same outputs)
    config = IsvitConfig.from_preset(w_bits=3, a_bits=3, preset="fast", iters=8, calib_size=32, end_to_end=EndToEnd(),
                                     **fields)
    qmodel = isvit.quantize(model, x, config, progress=False)
    layers = [m for m in qmodel.modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.enabled]
    assert layers and all(on_grid(m) for m in layers)
    path = tmp_path / "rounded.safetensors"
    save_quantized(qmodel, path, model_name=spec[0], config=config, data_config={}, model_args=spec[1])
    rebuilt, info = load_quantized(path)
    assert info["config"].resolved().reconstruction.rounding == rounding
    with torch.no_grad():
        assert torch.equal(rebuilt(x), qmodel(x))
    for name, m in rebuilt.named_modules():
        if hasattr(m, "weight_quantizer") and m.weight_quantizer.enabled:
            assert torch.equal(m.weight, dict(qmodel.named_modules())[name].weight)


# ---------------------------------------------------------------------------------------------
# Learnt step sizes (log domain)
# ---------------------------------------------------------------------------------------------

def test_a_learnt_scale_is_a_log_domain_factor_folded_back_on_freeze():
    q = UniformQuantizer(4)
    q.set_params(torch.tensor([0.5]), torch.tensor([3.0]))
    step = q.learnable_scale()
    assert q.learnable_scale() is step  # asked twice, one parameter
    with torch.no_grad():
        step.fill_(0.1)
    x = torch.linspace(-2, 5, 40)
    expected = UniformQuantizer(4)
    expected.set_params(torch.tensor([0.5 * torch.tensor(0.1).exp().item()]), torch.tensor([3.0]))
    assert torch.allclose(q(x), expected(x))
    q.freeze_scale()
    assert "log_scale_step" not in dict(q.named_parameters())
    assert set(q.state_dict()) == {"scale", "zero_point"}
    assert q.scale.item() == pytest.approx(0.5 * torch.tensor(0.1).exp().item())


# The small Swin's 3-bit error is small already (its unit loss falls by about 4%, the ViT's by more)
@pytest.mark.parametrize("make, ratio", [(small_vit, 0.95), (small_swin, 0.98)])
@pytest.mark.parametrize("rounding", ["ste", "offset"])
def test_learnt_activation_scales_lower_the_loss_and_only_activations_move_with_learnt_rounding(make, ratio, rounding):
    _, _, unit, inputs, targets = stage3_unit(make)
    scales = {n: q.scale.clone() for n, q in named_quantizers(unit) if isinstance(q, UniformQuantizer) and q.enabled}
    before = reconstruction_loss(unit, inputs, targets, "cpu")
    settings = Reconstruction(iters=40, batch_size=16, lr=1e-4, learn_scales=True, scale_lr=2e-2,
                                      rounding=rounding, round_lr=0.05)
    reconstruct_unit(unit, inputs, targets, settings, "cpu", progress=False)
    after = reconstruction_loss(unit, inputs, targets, "cpu")
    assert after < ratio * before, (before, after)
    moved = {n for n, q in named_quantizers(unit) if n in scales and not torch.equal(q.scale, scales[n])}
    assert any(not n.endswith("weight_quantizer") for n in moved)
    weights_moved = any(n.endswith("weight_quantizer") for n in moved)
    assert weights_moved == (rounding == "ste")  # with learnt rounding the weight grids stay
    assert all(isinstance(q.scale, torch.Tensor) and not isinstance(q.scale, torch.nn.Parameter)
               for _, q in named_quantizers(unit) if isinstance(q, UniformQuantizer))


# ---------------------------------------------------------------------------------------------
# The Fisher-weighted loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [small_vit, small_swin])
def test_output_importance_is_positive_finite_mean_one_and_shaped_like_a_unit_output(make):
    model = make()
    x = random_images(24)
    units = forward_units(model)
    maps = output_importance(units, x, "cpu", 8, seed=0)
    assert len(maps) == len(units)
    out = x[:1]
    with torch.no_grad():
        for unit, w in zip(units, maps):
            out = unit(out)
            assert w.shape == out.shape[1:]
            assert torch.isfinite(w).all() and (w >= 0).all() and (w > 0).any()
            assert w.mean().item() == pytest.approx(1.0, rel=1e-4)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_output_importance_is_the_squared_gradient_of_the_log_likelihood():
    # A model with one unit that is the identity on logits: d log p_y / d z = onehot(y) - p.
    class Logits(torch.nn.Module):
        def forward(self, z):
            return z * 1.0

    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    (w,) = output_importance([Logits()], z, "cpu", 2, seed=0)
    p = z.softmax(-1)
    y = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(0))
    g = torch.nn.functional.one_hot(y[:, 0], 3) - p
    expected = (g.pow(2) * z.var(-1, unbiased=False, keepdim=True)).sum(0)
    assert torch.allclose(w, expected / expected.mean(), atol=1e-6)


def test_the_fisher_loss_is_the_token_loss_when_every_importance_is_one():
    out, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert torch.allclose(token_errors(out, target, "fisher", torch.ones(5, 8)), token_errors(out, target, "token"))
    weight = torch.zeros(5, 8)
    weight[0] = 1.0  # only the first position counts
    err = token_errors(out, target, "fisher", weight)
    assert torch.equal(err[:, 1:], torch.zeros(2, 4)) and (err[:, 0] > 0).all()
    with pytest.raises(ValueError):
        token_errors(out, target, "fisher")


@pytest.mark.parametrize("make", [small_vit, small_swin])
def test_the_fisher_loss_lowers_its_unit_loss(make):
    fp, _, unit, inputs, targets = stage3_unit(make)
    weight = output_importance(forward_units(fp), random_images(48), "cpu", 16, seed=0)[1]
    before = reconstruction_loss(unit, inputs, targets, "cpu", loss="fisher", importance=weight)
    settings = Reconstruction(iters=40, batch_size=16, lr=3e-4, loss="fisher")
    reconstruct_unit(unit, inputs, targets, settings, "cpu", importance=weight, progress=False)
    after = reconstruction_loss(unit, inputs, targets, "cpu", loss="fisher", importance=weight)
    assert after < 0.9 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# Low activation percentiles, and the options reaching the pipeline
# ---------------------------------------------------------------------------------------------

def test_low_activation_percentiles_reach_every_activation_grid_and_lower_its_error():
    config = IsvitConfig(w_bits=3, a_bits=3, act_percentile=0.99)
    assert config.placement().activation_percentiles == (0.99, 0.995, 0.998) + ACTIVATION_PERCENTILES
    assert IsvitConfig().placement().activation_percentiles == ACTIVATION_PERCENTILES
    model = wrap_model(small_vit(), config.placement())
    grids = [q for _, q in named_quantizers(model, "activation") if isinstance(q, UniformQuantizer)]
    assert grids and all(q.percentiles == config.placement().activation_percentiles for q in grids)
    # Laplace: the MSE-optimal 3-bit clip is about 3.9 scales, 1% beyond it on each side (0.999 clips at 6.2)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    errors = {}
    for pmin in (0.999, 0.99):
        q = UniformQuantizer(3, percentiles=activation_percentiles(pmin))
        q.calibrate(x)
        errors[pmin] = (q(x) - x).pow(2).mean().item()
    assert errors[0.99] < errors[0.999]


@pytest.mark.parametrize("fields, lowest", [
    ({"method": "isvit", "preset": "fast", "w_bits": 3, "a_bits": 3}, 0.99),
    ({"method": "isvit", "preset": "fast", "w_bits": 4, "a_bits": 8}, 0.99),  # the lower of the two bit-widths
    ({"method": "isvit", "preset": "thorough", "w_bits": 4, "a_bits": 4}, 0.99),
    ({"method": "isvit", "preset": "fast", "w_bits": 6, "a_bits": 6}, 0.999),
    ({"method": "isvit", "preset": "paper", "w_bits": 3, "a_bits": 3}, 0.999),  # the paper's grids
    ({"method": "repq", "w_bits": 3, "a_bits": 3}, 0.999),  # the published peers' grids
    ({"method": "minmax", "w_bits": 4, "a_bits": 4}, 0.999),
    ({"method": "isvit", "preset": "fast", "w_bits": 3, "a_bits": 3, "act_percentile": 0.999}, 0.999),  # off
    ({"method": "repq", "w_bits": 4, "a_bits": 4, "act_percentile": 0.995}, 0.995),
])
def test_the_lowest_activation_percentile_comes_from_the_preset_at_low_bits(fields, lowest):
    config = method_config(**fields)
    assert config.resolved().act_percentile == lowest and config.to_dict()["act_percentile"] == lowest
    expected = tuple(sorted({lowest, *(p for p in (0.99, 0.995, 0.998) if p >= lowest), *ACTIVATION_PERCENTILES}))
    assert config.placement().activation_percentiles == expected
    # the resolved config, saved and rebuilt (as a checkpoint does), searches the same grids
    assert isvit.config_from_dict(config.to_dict()).placement().activation_percentiles == expected


@pytest.mark.parametrize("fields, loss", [
    ({"preset": "fast", "w_bits": 3, "a_bits": 3}, "fisher"),
    ({"preset": "fast", "w_bits": 8, "a_bits": 4}, "fisher"),  # the lower of the two bit-widths
    ({"preset": "thorough", "w_bits": 4, "a_bits": 4}, "fisher"),
    ({"preset": "fast", "w_bits": 6, "a_bits": 6}, "token"),
    ({"preset": "paper", "w_bits": 3, "a_bits": 3}, "mse"),  # the paper's loss
    ({"preset": "fast", "w_bits": 3, "a_bits": 3, "loss": "token"}, "token"),  # off
])
def test_the_fast_and_thorough_presets_weight_the_loss_by_fisher_importance_at_low_bits(fields, loss):
    config = IsvitConfig.from_preset(**fields)
    assert config.resolved().reconstruction.loss == loss and config.to_dict()["reconstruction"]["loss"] == loss
    # the resolved config, saved and rebuilt (as a checkpoint does), trains with the same loss
    assert isvit.config_from_dict(config.to_dict()).resolved().reconstruction.loss == loss


@pytest.mark.parametrize("fields, rounding, round_lr", [
    ({"preset": "fast", "w_bits": 3, "a_bits": 3}, "offset", 0.03),
    ({"preset": "fast", "w_bits": 8, "a_bits": 4}, "offset", 0.03),  # the lower of the two bit-widths
    ({"preset": "fast", "w_bits": 6, "a_bits": 6}, "ste", None),
    ({"preset": "thorough", "w_bits": 3, "a_bits": 3}, "ste", None),  # the long schedule's latent weights
    ({"preset": "paper", "w_bits": 3, "a_bits": 3}, "ste", None),  # the paper's
    ({"preset": "fast", "w_bits": 3, "a_bits": 3, "rounding": "ste"}, "ste", None),  # off
    ({"preset": "fast", "w_bits": 4, "a_bits": 4, "rounding": "adaround"}, "adaround", 0.3),
])
def test_the_fast_preset_learns_rounding_offsets_at_low_bits(fields, rounding, round_lr):
    config = IsvitConfig.from_preset(**fields)
    settings = config.resolved().reconstruction
    assert (settings.rounding, settings.round_lr) == (rounding, round_lr)
    saved = config.to_dict()["reconstruction"]
    assert (saved["rounding"], saved["round_lr"]) == (rounding, round_lr)
    # the resolved config, saved and rebuilt (as a checkpoint does), trains the same way
    assert isvit.config_from_dict(config.to_dict()).resolved().reconstruction == settings


@pytest.mark.parametrize("field, value", [("rounding", "nearest"), ("round_lr", 0.0), ("round_reg", -1.0),
                                          ("scale_lr", -1e-3), ("act_percentile", 0.5), ("loss", "kl")])
def test_bad_option_values_are_refused_in_one_sentence(field, value):
    with pytest.raises(isvit.IsvitError, match=field.split("_")[0]):
        IsvitConfig.from_preset(**{field: value})


def test_the_options_reach_the_reconstruction_settings():
    config = IsvitConfig.from_preset(preset="fast", rounding="offset", round_lr=0.03, round_reg=0.5,
                                     scale_lr=1e-2, learn_scales=True, loss="fisher")
    settings = config.resolved().reconstruction
    assert settings.rounding == "offset" and settings.round_lr == 0.03 and settings.round_reg == 0.5
    assert settings.scale_lr == 1e-2 and settings.learn_scales and settings.loss == "fisher"
    assert config.to_dict()["reconstruction"]["rounding"] == "offset"


@pytest.mark.parametrize("preset, rounding, lr, reg", [
    ("fast", "adaround", 0.3, 1000.0), ("fast", "offset", 0.03, 1000.0), ("fast", "ste", None, 1000.0),
    ("paper", "adaround", 1e-2, 0.1), ("thorough", "offset", 1e-2, 0.1),
])
def test_each_learnt_rounding_takes_its_own_learning_rate_from_the_preset(preset, rounding, lr, reg):
    config = IsvitConfig.from_preset(preset=preset, rounding=rounding)
    settings = config.resolved().reconstruction
    assert (settings.rounding, settings.round_lr, settings.round_reg) == (rounding, lr, reg)
    # the resolved config, saved and rebuilt (as a checkpoint does), resolves the same way
    assert isvit.config_from_dict(config.to_dict()).resolved().reconstruction == settings
