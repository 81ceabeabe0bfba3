"""BEiT, EVA-02 and Swin V2 (timm ``Beit``, ``Eva``, ``SwinTransformerV2``): what is theirs alone.

The adapter contract (test_contract.py) takes their small random models (family_examples.py:
``beit``, ``beit-swiglu``, ``eva02``, ``eva02-base``, ``swinv2``) through the surgery, the fold,
the rotation or its refusal, minmax and repq at W8/A8, the isvit fast preset at W4/A4, the
checkpoint and the ONNX export. Here: which LayerNorm -> Linear pairs the fold finds (Swin V2's
post-norm blocks have none), and what the families cannot carry, refused in one sentence before
any change.
"""

from __future__ import annotations

import pytest
import timm

import isvit
from isvit.wrap import post_layernorm_pairs, wrap_model

from conftest import random_images
from family_examples import SMALL, refused_before_any_change, small_model


@pytest.mark.parametrize("variant", ["beit", "beit-swiglu", "eva02", "eva02-base", "swinv2"])
def test_the_post_layernorm_pairs(variant):
    wrapped = wrap_model(small_model(variant), isvit.RepqConfig(w_bits=8, a_bits=8).placement())
    pairs = post_layernorm_pairs(wrapped)
    if variant == "swinv2":
        assert pairs == []  # post-norm: the fold has nothing to do
    else:  # norm1 -> qkv and norm2 -> fc1 in every block at least
        assert len(pairs) >= 2 * SMALL["depth"]


REFUSED = {
    "beit-shared-bias": ("beit_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False},
                         "shares one relative position bias among its blocks"),
    "eva-post-norm": ("eva02_tiny_patch14_224", {"ref_feat_shape": (4, 4), "use_post_norm": True},
                      "is a EvaBlockPostNorm with EvaAttention; isvit supports timm's pre-norm EvaBlock"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_a_family_cannot_carry_is_one_sentence_before_any_change(case):
    name, extra, message = REFUSED[case]
    model = timm.create_model(name, pretrained=False, **{**SMALL, **extra}).eval()
    refused_before_any_change(model, random_images(4, seed=1, size=SMALL["img_size"]), message)
