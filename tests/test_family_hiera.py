"""Hiera and SAM 2's Hiera (timm ``Hiera``, ``HieraDet``): what is theirs alone.

The small models keep what the full-size ones have: Hiera's mask-unit attention without and with q
pooling, global attention without and with it, stage transitions with the block's dim-changing
``proj`` (or, abs-win, without it: the stream itself max- and average-pooled) and LayerScale; HieraDet's
windowed attention (a 16 x 16 grid in windows of 4, an 8 x 8 grid padded to windows of 6), q pooling
by MaxPool2d, a global block and the classifier or none (SAM 2's feature extractor, ``num_classes=0``).

The adapter contract (test_contract.py) takes them (family_examples.py: ``hiera``,
``hiera-abswin``, ``sam2-hiera``, ``sam2-features``) through the surgery, the fold, the rotation's
refusal, minmax and repq at W8/A8, the isvit fast preset at W4/A4 (without rotation, with a
warning), the checkpoint and the ONNX export. Here: the stage transitions' projections are
quantized; SAM 2's multi-scale features come from the quantized blocks; the fold takes exactly the
pairs it can (a norm1 that feeds more than its qkv is not folded); what the adapters cannot carry
is refused in one sentence before any module is swapped.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import isvit
from isvit.errors import IsvitError
from isvit.modules import QuantLinear, QuantMatMul
from isvit.wrap import Placement, post_layernorm_pairs, wrap_model

from conftest import random_images
from family_examples import HIERA, HIERADET, params, refused_before_any_change, runs_with, small_model

IMG = 64


@pytest.mark.parametrize("variant", params("hiera", "hiera-abswin", "sam2-hiera"))
def test_the_stage_transitions_projections_are_quantized(variant):
    """Hiera's blocks that widen the stream do it with a Linear of their own (``proj``), quantized
    like the rest; abs-win Hiera pools the stream itself and has none."""
    wrapped = wrap_model(small_model(variant), Placement(w_bits=8, a_bits=8))
    assert len(wrapped.blocks) == 6
    expanding = sum(isinstance(getattr(b, "proj", None), QuantLinear) for b in wrapped.blocks)
    assert expanding == (0 if variant == "hiera-abswin" else 3)


@runs_with("sam2-features")
def test_sam2_multi_scale_features_come_from_the_quantized_blocks():
    """SAM 2 reads the stage ends (``forward_intermediates``): the wrapped model's, quantizers off,
    are the original's."""
    model = small_model("sam2-features")
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    x = random_images(2, seed=1, size=IMG)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        got = wrapped.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1:] for f in got] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert all(torch.allclose(g, e, atol=1e-5, rtol=1e-5) for g, e in zip(got, expected))


@pytest.mark.parametrize("variant", params("hiera", "hiera-abswin", "sam2-hiera", "sam2-features"))
def test_the_post_layernorm_pairs(variant):
    wrapped = wrap_model(small_model(variant), isvit.RepqConfig(w_bits=8, a_bits=8).placement())
    # norm2 -> fc1 in every block; norm1 -> qkv where norm1 feeds qkv alone (Hiera: no proj;
    # HieraDet: the global block that keeps its width, windows pad with zeros)
    names = [name for name, _, _ in post_layernorm_pairs(wrapped)]
    norm1 = {"hiera": [0, 2, 4], "hiera-abswin": [0, 1, 2, 3, 4, 5], "sam2-hiera": [4], "sam2-features": [4]}[variant]
    expected = sorted([f"blocks.{i}.norm1" for i in norm1] + [f"blocks.{i}.norm2" for i in range(6)])
    assert names == expected


REFUSED = {
    "hiera-rmsnorm": ("hiera_tiny_224", {**HIERA, "norm_layer": "rmsnorm"}, r"blocks.0.norm1 is a RmsNorm"),
    "hieradet-rmsnorm": ("sam2_hiera_tiny", {**HIERADET, "norm_layer": "rmsnorm"}, r"blocks.0.norm1 is a RmsNorm"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.skipif(not timm.is_model(REFUSED[c][0]),
                                                                            reason=f"no {REFUSED[c][0]}"))
                                  for c in REFUSED])
def test_what_an_adapter_cannot_carry_is_one_sentence_before_any_change(case):
    name, args, message = REFUSED[case]
    model = timm.create_model(name, pretrained=False, **args).eval()
    refused_before_any_change(model, random_images(4, seed=1, size=IMG), message)


@pytest.mark.skipif(not hasattr(timm.layers, "ClNormMlpClassifierHead"), reason="timm before 1.0.9")
def test_a_head_with_a_hidden_layer_is_refused_before_any_change():
    model = small_model("hiera")
    model.head = timm.layers.ClNormMlpClassifierHead(128, 10, hidden_size=32, input_fmt="NLC")
    with pytest.raises(IsvitError, match="the head has a hidden layer"):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (QuantLinear, QuantMatMul)) for m in model.modules())
