"""AIMv2 (timm ``VisionTransformer`` with SwiGLU MLPs and RmsNorm norms) and SigLIP 2 NaFlex (timm
``NaFlexVit``): what is theirs alone.

The adapter contract (test_contract.py) takes their small random models (family_examples.py:
``aimv2``, ``aimv2-tower``, ``naflex-siglip``, ``naflex-gap``, ``naflex-map``, ``naflex-token``,
``naflex-conv``) through the surgery, the fold, the rotation, minmax and repq at W8/A8, the isvit
fast preset at W4/A4 (rotated), the checkpoint and the ONNX export. Here: the LayerNorm -> Linear
pairs (AIMv2's RmsNorm has no bias to fold into: no pairs; rotated, its norms are RMSNorms and are
folded, exactly); rotation exact in float64, on NCHW images and padded NaFlex batches; NaFlexVit,
calibrated on NCHW images, gives a padded NaFlex dict batch what it gives the images themselves
(its grids and its attention do not depend on the padding), after the fast preset too; the
quantized attention honours a mask; what the families cannot carry, refused in one sentence before
any change.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import RmsNorm
from timm.models.naflexvit import batch_patchify
from torch import nn

import isvit
from isvit.errors import IsvitError
from isvit.modules import QuantLinear
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm
from isvit.quantizers import UniformQuantizer
from isvit.rotate import is_rotated, rotate_model
from isvit.wrap import post_layernorm_pairs, wrap_model

from conftest import random_images
from family_examples import NAFLEX, refused_before_any_change, small_model
from family_examples import SMALL64 as SMALL

VARIANTS = ["aimv2", "aimv2-tower", "naflex-siglip", "naflex-gap", "naflex-map", "naflex-token", "naflex-conv"]
NAFLEX_VARIANTS = [v for v in VARIANTS if v.startswith("naflex")]


def naflex_batch(x: torch.Tensor, length: int, seed: int) -> dict[str, torch.Tensor]:
    """``x``'s patches as a NaFlex dict (row-major, as timm's NaFlex loader gives them) padded to
    ``length`` patches with random ones that ``patch_valid`` marks invalid (coordinates 0)."""
    patches, (h, w) = batch_patchify(x, (16, 16))
    B, N, D = patches.shape
    coord = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(1, N, 2)
    pad = length - N
    junk = 3 * torch.randn(B, pad, D, generator=torch.Generator().manual_seed(seed))
    return {
        "patches": torch.cat([patches, junk], 1),
        "patch_coord": torch.cat([coord.expand(B, -1, -1), torch.zeros(B, pad, 2, dtype=torch.long)], 1),
        "patch_valid": torch.cat([torch.ones(B, N, dtype=torch.bool), torch.zeros(B, pad, dtype=torch.bool)], 1),
    }


# ---------------------------------------------------------------------------------------------
# Surgery, fold, rotation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["aimv2", "naflex-siglip", "naflex-gap"])
def test_the_post_layernorm_pairs(variant):
    wrapped = wrap_model(small_model(variant), isvit.RepqConfig(w_bits=8, a_bits=8).placement())
    calibrate_weights(wrapped)
    calibrate_activations(wrapped, random_images(8, seed=2))  # the granularity of the input quantizers: their scales
    pairs = post_layernorm_pairs(wrapped)
    if variant == "aimv2":  # timm's RmsNorm has no bias: qkv and fc1 per tensor, nothing to fold
        assert pairs == []
        assert not any(m.input_quantizer.is_per_channel for m in wrapped.modules() if isinstance(m, QuantLinear)
                       and isinstance(m.input_quantizer, UniformQuantizer))
    else:
        assert len(pairs) == 2 * SMALL["depth"]


@pytest.mark.parametrize("variant", ["aimv2", "naflex-siglip", "naflex-gap"])
def test_the_fold_of_a_rotated_model_leaves_the_function_unchanged(variant):
    """Rotated, AIMv2's norms are RMSNorms (a LayerNorm's without the mean), whose pairs fold."""
    model = small_model(variant)
    start = copy.deepcopy(model)
    rotate_model(start)
    wrapped = wrap_model(start, isvit.RepqConfig(w_bits=8, a_bits=8).placement())
    calibrate_weights(wrapped)
    calibrate_activations(wrapped, random_images(8, seed=2))
    isvit.set_quantizers(wrapped, False)
    pairs = post_layernorm_pairs(wrapped)
    fold_post_layernorm(wrapped)
    x = random_images(4, seed=3)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-4, rtol=1e-4)
    assert len(pairs) == 2 * SMALL["depth"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotation_is_exact(variant):
    model = small_model(variant).double()
    rotated = copy.deepcopy(model)
    rotate_model(rotated)
    rotated.double()
    assert is_rotated(rotated) and not any(isinstance(m, RmsNorm) for m in rotated.modules())
    x = random_images(4, seed=10).double()
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(rotated(x), expected, atol=1e-9, rtol=1e-9)
        if variant in NAFLEX_VARIANTS and "conv" not in variant:  # and on a padded NaFlex batch
            batch = naflex_batch(x, 20, seed=11)
            assert torch.allclose(rotated(batch), model(batch), atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Quantized
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["naflex-siglip", "naflex-gap", "naflex-map", "naflex-token"])
def test_a_padded_naflex_batch_gives_what_its_images_give(variant):
    """Calibrated on NCHW images only; then a NaFlex dict of the same images' patches, padded with
    random invalid patches, gives their outputs; so does a smaller image (3 x 4 patches) padded
    to the same length. SULQ's lowest level is not 0: without ``attended_keys`` the padding would
    still get weight in the quantized attention."""
    model = small_model(variant)
    config = isvit.RepqConfig(w_bits=8, a_bits=8, calib_size=16, softmax_quantizer="sulq")
    quantized = isvit.quantize(model, random_images(16, seed=4), config, progress=False)
    with torch.no_grad():
        for size, seed in (((64, 64), 12), ((48, 64), 13)):
            x = random_images(4, seed=seed, size=size)
            expected = quantized(x)
            for length, junk in ((20, 0), (24, 1)):
                got = quantized(naflex_batch(x, length, seed=junk))
                assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (size, length)


def test_the_quantized_attention_honours_a_mask():
    """A block given a key-padding mask: the valid tokens' output is the block's on those tokens alone."""
    model = small_model("naflex-siglip")
    config = isvit.MinmaxConfig(w_bits=4, a_bits=4, calib_size=8, softmax_quantizer="sulq")
    quantized = isvit.quantize(model, random_images(8, seed=4), config, progress=False)
    block = quantized.blocks[0]
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(14))
    padded = torch.cat([x, 5 * torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(15))], 1)
    valid = torch.arange(22) < 16
    for mask in (valid.view(1, 1, 1, 22).expand(2, 1, 22, 22),  # boolean, key-only
                 torch.zeros(2, 1, 22, 22).masked_fill_(~(valid[:, None] & valid[None, :]), torch.finfo(torch.float32).min)):
        with torch.no_grad():
            assert torch.allclose(block(padded, attn_mask=mask)[:, :16], block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["naflex-siglip", "naflex-gap"])
def test_the_fast_preset_keeps_a_naflex_batch_independent_of_its_padding(variant):
    """After rotation and reconstruction (the isvit fast preset at W4/A4) too."""
    model = small_model(variant)
    config = isvit.IsvitConfig.from_preset(preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    quantized = isvit.quantize(model, random_images(8, seed=6), config, progress=False)
    assert is_rotated(quantized)
    x = random_images(4, seed=8)
    with torch.no_grad():
        assert torch.allclose(quantized(naflex_batch(x, 20, seed=2)), quantized(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Refused
# ---------------------------------------------------------------------------------------------

REFUSED = {
    "naflex-patch-interpolator": ("naflexvit_base_patch16_siglip", {**NAFLEX, "enable_patch_interpolator": True},
                                  "enable_patch_interpolator"),
    "naflex-rope": ("naflexvit_base_patch16_siglip", {**NAFLEX, "rope_type": "axial", "pos_embed": "none"},
                    "blocks.0 is a EvaBlock"),
    "aimv2-swiglu-sub-norm": ("aimv2_large_patch14_224", {**SMALL, "scale_mlp_norm": True},
                              "blocks.0.mlp.norm is a RmsNorm; isvit supports a ViT block's SwiGLU without a sub-norm"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_families_cannot_carry_is_one_sentence_before_any_change(case):
    name, args, message = REFUSED[case]
    model = timm.create_model(name, pretrained=False, **args).eval()
    refused_before_any_change(model, random_images(4, seed=1), message)


def test_rotation_refuses_mixed_norms_before_any_change():
    model = small_model("aimv2")
    model.blocks[1].norm2 = nn.LayerNorm(32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IsvitError, match="blocks.1.norm2 is a LayerNorm; rotation needs a RmsNorm there"):
        rotate_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
