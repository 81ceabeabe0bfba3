"""The contract every registered model-family adapter keeps (``isvit.families``), checked on
small random models of each (``family_examples.py``; a registered family without one fails):

- its checks run before any surgery: a block with an attention isvit does not know is refused in
  one sentence and the model is left as it was (module types and tensors);
- the surgery is exact: the wrapped model with every quantizer off, and its units run in order,
  compute the float model's output;
- the post-LayerNorm fold (repq's reparameterisation) leaves the full-precision function unchanged;
- its rotation is exact (a family that rotates) or refused with the family's reason, the model
  left unchanged (one that does not);
- a quantized model (the isvit fast preset, with its rotation where the family has one) reloads
  from its checkpoint to bit-identical outputs.
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
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm, placement_for
from isvit.rotate import is_rotated, rotate_model
from isvit.wrap import Placement, forward_units, wrap_model

from family_examples import EXAMPLES

CASES = [(family, variant) for family, variants in EXAMPLES.items() for variant in variants]


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


@pytest.mark.parametrize("family,variant", CASES)
def test_the_fold_is_exact(family, variant):
    ex = example(family, variant)
    model = ex.model()
    wrapped = wrap_model(copy.deepcopy(model), placement_for(isvit.QuantConfig(method="repq", w_bits=8, a_bits=8)))
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
        assert adapter.no_rotation in str(refusal.value)
        assert unchanged(model, before)
        return
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=1)
    assert is_rotated(rotated)
    x = ex.images(4, seed=4)
    with torch.no_grad():
        assert close(rotated(x), model(x), 1e-4)


@pytest.mark.parametrize("family,variant", CASES)
def test_a_quantized_model_reloads_bit_exactly(family, variant, tmp_path):
    ex = example(family, variant)
    model = ex.model()
    config = isvit.QuantConfig(method="isvit", preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a family without rotation warns that the preset goes without
        quantized = isvit.quantize(model, ex.images(8, seed=5), config, progress=False)
    path = tmp_path / "q.safetensors"
    save_quantized(quantized, path, model_name=ex.timm_name, config=config,
                   data_config={"input_size": [3, ex.img_size, ex.img_size]}, model_args=ex.args)
    rebuilt, _ = load_quantized(path)
    assert is_rotated(rebuilt) == is_rotated(quantized) == (families.family_of(model).rotation_name is not None)
    x = ex.images(4, seed=6)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), quantized(x))
