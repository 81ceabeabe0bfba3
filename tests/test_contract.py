"""The contract every registered model-family adapter keeps (``isvit.families``), checked on
small random models of each variant (``family_examples.py``; a registered family without one fails):

- its checks run before any surgery: a block with an attention isvit does not know is refused in
  one sentence and the model is left as it was (module types and tensors);
- the surgery is exact: the wrapped model with every quantizer off, and its units run in order,
  compute the float model's output; every Linear is quantized (but an attention pool's and Swin
  V2's position-bias MLP, left float) and both products of every block's attention;
- the post-LayerNorm fold (repq's reparameterisation) leaves the full-precision function unchanged;
- its rotation is exact (a family that rotates) or refused in one sentence with the family's
  reason, the model left unchanged (one that does not);
- minmax and repq at W8/A8 agree with full precision (a classifier's argmax on most of a batch, a
  feature tower's features within a tenth of their spread);
- the isvit fast preset at W4/A4 runs to finite outputs, rotated where the family rotates (else
  with one warning that says why); the quantized model reloads from its checkpoint to
  bit-identical outputs, and its ONNX export computes what PyTorch computes (the tolerance of
  test_export.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import isvit
from isvit import families
from isvit.checkpoint import load_quantized, save_quantized
from isvit.errors import IsvitError
from isvit.export import export_onnx, folded_tables, load_onnx
from isvit.modules import QuantLinear, QuantMatMul
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm
from isvit.quantizers import Quantizer
from isvit.rotate import is_rotated, rotate_model
from isvit.wrap import Placement, forward_units, is_block, wrap_model

from conftest import agreement, method_config
from family_examples import CLASSES, EXAMPLES, cases

CASES = cases()


def example(family: str, variant: str):
    return EXAMPLES[family][variant]


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    return ({name: type(m) for name, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def unchanged(model: nn.Module, before: tuple[dict, dict]) -> bool:
    types, state = before
    now = model.state_dict()
    return ({name: type(m) for name, m in model.named_modules()} == types and now.keys() == state.keys()
            and all(torch.equal(now[k], v) for k, v in state.items()))


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1.0))


def left_float(name: str) -> bool:
    """The Linears every family leaves float: an attention pool's, Swin V2's position-bias MLP."""
    return name.startswith("attn_pool") or "cpb_mlp" in name


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_every_registered_family_has_an_example_of_its_own(family):
    assert EXAMPLES.get(family.name), f"add a small model of {family.name!r} to tests/family_examples.py"
    for ex in EXAMPLES[family.name].values():
        assert families.family_of(ex.model()) is family


class ForeignAttention(nn.Module):
    """An attention module no family knows."""

    def forward(self, x, *args, **kwargs):
        return x


@pytest.mark.parametrize("family,variant", CASES)
def test_checks_run_before_any_surgery(family, variant):
    model = example(family, variant).model()
    adapter = families.family_of(model)
    before = snapshot(model)
    adapter.check(model)  # a supported model passes and is not touched
    assert unchanged(model, before)
    block = next(m for m in model.modules() if isinstance(m, adapter.block_types))
    block.attn = ForeignAttention()
    before = snapshot(model)
    with pytest.raises(IsvitError) as refusal:
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert "\n" not in str(refusal.value) and "ForeignAttention" in str(refusal.value)
    assert unchanged(model, before)


@pytest.mark.parametrize("family,variant", CASES)
def test_surgery_is_exact(family, variant):
    ex = example(family, variant)
    model = ex.model()
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    x = ex.images(4, seed=1)
    with torch.no_grad():
        expected = model(x)
        through_units = x
        for unit in forward_units(wrapped):
            through_units = unit(through_units)
        assert close(wrapped(x), expected, 1e-5) and close(through_units, expected, 1e-5)
    assert expected.std(1).min() > 0.5  # outputs that differ: the redraw made every part count
    # every Linear is quantized but those left float, and both products of every block's attention
    assert not [n for n, m in wrapped.named_modules() if type(m) is nn.Linear and not left_float(n)]
    blocks = sum(is_block(unit.body) for unit in forward_units(wrapped))
    assert blocks == sum(isinstance(m, families.family_of(model).block_types) for m in model.modules()) > 0
    assert sum(isinstance(m, QuantMatMul) for m in wrapped.modules()) == 2 * blocks


@pytest.mark.parametrize("family,variant", CASES)
def test_the_fold_is_exact(family, variant):
    ex = example(family, variant)
    model = ex.model()
    wrapped = wrap_model(copy.deepcopy(model), isvit.RepqConfig(w_bits=8, a_bits=8).placement())
    calibrate_weights(wrapped)
    calibrate_activations(wrapped, ex.images(8, seed=2))
    isvit.set_quantizers(wrapped, False)
    fold_post_layernorm(wrapped)
    x = ex.images(4, seed=3)
    with torch.no_grad():
        assert close(wrapped(x), model(x), 1e-4)


@pytest.mark.parametrize("family,variant", CASES)
def test_rotation_is_exact_or_refused_with_the_reason(family, variant):
    ex = example(family, variant)
    model = ex.model()
    adapter = families.family_of(model)
    before = snapshot(model)
    if adapter.rotation_name is None:
        with pytest.raises(IsvitError) as refusal:
            rotate_model(model)
        message = str(refusal.value)
        assert message.startswith("rotation supports ") and "\n" not in message
        assert f"models, not {type(model).__name__} ({adapter.no_rotation})" in message
        assert unchanged(model, before)
        return
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=1)
    assert is_rotated(rotated)
    x = ex.images(4, seed=4)
    with torch.no_grad():
        assert close(rotated(x), model(x), 1e-4)


@pytest.mark.parametrize("method", ["minmax", "repq"])
@pytest.mark.parametrize("family,variant", CASES)
def test_w8a8_agrees_with_full_precision(family, variant, method):
    ex = example(family, variant)
    model = ex.model()
    config = method_config(method=method, w_bits=8, a_bits=8, calib_size=16)
    quantized = isvit.quantize(copy.deepcopy(model), ex.images(16, seed=4), config, progress=False)
    x = ex.images(32, seed=5)
    with torch.no_grad():
        q, fp = quantized(x), model(x)
    assert q.shape == fp.shape
    if ex.classifier:
        assert agreement(q, fp) >= 0.8
    else:  # a feature tower: no argmax to agree on
        assert (q - fp).abs().mean() <= 0.1 * fp.std()


@pytest.fixture(scope="module", params=cases(as_one=True))
def fast_w4a4(request):
    """The isvit fast preset at W4/A4 (one iteration per unit) on one example, shared by the tests
    below: rotated where the family rotates; else it warns, once, with the family's reason, and
    goes without."""
    family, variant = request.param
    ex = example(family, variant)
    model = ex.model()
    adapter = families.family_of(model)
    config = isvit.IsvitConfig.from_preset(preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = isvit.quantize(copy.deepcopy(model), ex.images(8, seed=6), config, progress=False)
    told = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "rotation" in str(w.message)]
    if adapter.rotation_name is None:
        assert not is_rotated(quantized)
        assert len(told) == 1
        assert f"({adapter.no_rotation}): quantizing it without the fast preset's rotation" in told[0]
    else:
        assert is_rotated(quantized) and told == []
    return ex, model, quantized, config


def test_the_fast_preset_gives_finite_outputs(fast_w4a4):
    ex, model, quantized, _ = fast_w4a4
    x = ex.images(8, seed=7)
    with torch.no_grad():
        got, fp = quantized(x), model(x)
    assert got.shape == fp.shape and (got.shape[1] == CLASSES) == ex.classifier
    assert torch.isfinite(got).all()
    assert all(m.input_quantizer.is_calibrated for m in quantized.modules()
               if isinstance(m, QuantLinear) and isinstance(m.input_quantizer, Quantizer))


def test_a_quantized_model_reloads_bit_exactly(fast_w4a4, tmp_path):
    ex, _, quantized, config = fast_w4a4
    path = tmp_path / "q.safetensors"
    save_quantized(quantized, path, model_name=ex.timm_name, config=config,
                   data_config={"input_size": [3, ex.img_size, ex.img_size]}, model_args=ex.args)
    rebuilt, _ = load_quantized(path)
    assert is_rotated(rebuilt) == is_rotated(quantized)
    x = ex.images(4, seed=8)
    with torch.no_grad():
        # every redrawn parameter (the head too) is in the file like every other
        assert torch.equal(rebuilt(x), quantized(x))


def test_the_onnx_export_computes_what_pytorch_computes(fast_w4a4, tmp_path):
    ex, model, quantized, config = fast_w4a4
    path = tmp_path / "q.onnx"
    data_config = isvit.resolve_data_config(model, input_size=ex.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = export_onnx(quantized, path, model_name=ex.timm_name, config=config, data_config=data_config,
                             model_args=ex.args)
    # every quantized Linear and product is an integer product; only the patch embedding (on the
    # float image) is a float one, a convolution or NaFlexVit's Linear
    layers = sum(isinstance(m, (QuantLinear, QuantMatMul)) for m in quantized.modules())
    embeds = getattr(quantized, "embeds", None)  # NaFlexVit's patch embedding, a Linear
    embedding = 0 if embeds is None else sum(isinstance(m, QuantLinear) for m in embeds.modules())
    assert counts["integer"] >= layers - embedding and counts["float"] == 1
    onnx_model, _ = load_onnx(path, threads=1)
    x = ex.images(16, seed=9)
    with torch.no_grad(), folded_tables(quantized):
        expected, fp = quantized(x), model(x)
        got = onnx_model(x)
    assert got.shape == expected.shape
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 15
    assert (got - expected).abs().mean() <= 0.5 * (expected - fp).abs().mean()
