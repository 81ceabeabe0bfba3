"""DINOv3, the RoPE ViTs and the Perception Encoder (timm ``Eva`` models): what is theirs alone.

The adapter contract (test_contract.py) takes their small random models (family_examples.py:
``dinov3``, ``dinov3-qkvb``, ``rope-mixed``, ``rope-axial``, ``rope-ape``, ``rope-gqa``,
``pe-core``, ``pe-spatial``) through the surgery, the fold, the rotation, minmax and repq at W8/A8,
the isvit fast preset at W4/A4 (rotated), the checkpoint and the ONNX export. Here: DINOv3 takes
dynamic image sizes (wrapped, and quantized at one size, it runs at another); the LayerNorm ->
Linear pairs the fold finds; the rotation (residual stream, v and proj per head; not q and k, which
the rotary embedding turns) in detail, classifier or feature tower, and rotated W8/A8; what the
families cannot carry, refused in one sentence before any change.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import isvit
from isvit.errors import IsvitError
from isvit.modules import RMSNorm, RotatedLayerNorm, Unrotate
from isvit.rotate import is_rotated, rotate_model
from isvit.wrap import Placement, forward_units, post_layernorm_pairs, wrap_model

from conftest import agreement, random_images
from family_examples import SMALL64 as SMALL
from family_examples import VARIANTS as EXAMPLES
from family_examples import refused_before_any_change, small_model

SIZE = SMALL["img_size"]
FAMILIES = ["dinov3", "rope-mixed", "pe-core"]
VARIANTS = [*FAMILIES, "dinov3-qkvb", "rope-axial", "rope-ape", "pe-spatial", "rope-gqa"]


def through_units(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for unit in forward_units(model):
        x = unit(x)
    return x


def test_dinov3_wrapped_runs_at_other_image_sizes_through_the_model_and_its_units():
    """The model at any size (timm's dynamic_img_size); its units at a square grid other than its own."""
    model = small_model("dinov3")
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    with torch.no_grad():
        for size in ((96, 80), 48):
            x = random_images(2, size, seed=2)
            assert torch.allclose(wrapped(x), model(x), atol=1e-5, rtol=1e-5)
        x = random_images(2, 96, seed=3)
        assert torch.allclose(through_units(wrapped, x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_post_layernorm_pairs(variant):
    wrapped = wrap_model(small_model(variant), isvit.RepqConfig(w_bits=8, a_bits=8).placement())
    # norm1 -> qkv and norm2 -> fc1 in every block, and the sub-LayerNorms where there are
    inner = 2 if variant == "rope-gqa" else 0
    assert len(post_layernorm_pairs(wrapped)) == (2 + inner) * SMALL["depth"]


@pytest.mark.parametrize("rotate", [False, True])
def test_dinov3_quantized_at_one_size_runs_close_to_full_precision_at_another(rotate):
    model = small_model("dinov3")
    config = isvit.MinmaxConfig(w_bits=8, a_bits=8, calib_size=16, rotate=rotate)
    quantized = isvit.quantize(copy.deepcopy(model), random_images(16, SIZE, seed=4), config, progress=False)
    x = random_images(32, (96, 80), seed=5)
    with torch.no_grad():
        got, fp = quantized(x), model(x)
    assert got.shape == (32, 10) and torch.isfinite(got).all()
    assert agreement(got, fp) >= 0.8
    assert (got - fp).abs().mean() <= 0.2 * fp.std()


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
    x = random_images(4, SIZE, seed=1)
    before, inputs = block_inputs(model, x)
    after, rotated_inputs = block_inputs(rotated, x)
    # measured: 2e-7 to 1.3e-6 of the largest logit
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    if variant.startswith("dinov3"):  # another image size: the rotary embedding built for it
        other = random_images(2, (96, 80), seed=2)
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
    ex = EXAMPLES[variant]
    torch.manual_seed(0)
    model = timm.create_model(ex.timm_name, pretrained=False, **{**ex.args, "num_classes": 0}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    assert sum(isinstance(m, Unrotate) for m in rotated.modules()) == 1
    x = random_images(2, SIZE, seed=1)
    with torch.no_grad():
        for forward in ("forward", "forward_features"):
            before, after = getattr(model, forward)(x), getattr(rotated, forward)(x)
            assert (after - before).abs().max() <= 1e-5 * before.abs().max(), forward


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_w8a8_minmax_agrees_with_full_precision(family):
    model = small_model(family)
    config = isvit.MinmaxConfig(w_bits=8, a_bits=8, calib_size=16, rotate=True)
    quantized = isvit.quantize(model, random_images(16, SIZE, seed=4), config, progress=False)
    assert is_rotated(quantized)
    x = random_images(32, SIZE, seed=5)
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
    refused_before_any_change(model, random_images(4, SIZE, seed=1), message)
