"""AIMv2 (timm ``VisionTransformer`` with SwiGLU MLPs and RmsNorm norms) and SigLIP 2 NaFlex (timm
``NaFlexVit``): small random models through every method.

Per model: the wrapped model with every quantizer off is the original, through ``model(x)`` and
through its units; the post-LayerNorm fold leaves the function unchanged (AIMv2's RmsNorm has no
bias to fold into: no pairs; rotated, its norms are RMSNorms and are folded); minmax and repq at
W8/A8 agree with full precision on most of a batch; rotation is exact (float64); the isvit fast
preset at W4/A4 runs with rotation; a saved checkpoint reloads bit-exact; the ONNX export computes
what PyTorch computes. NaFlexVit, calibrated on NCHW images, gives a padded NaFlex dict batch what
it gives the images themselves: its grids and its attention do not depend on the padding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from timm.layers import RmsNorm
from timm.models.naflexvit import batch_patchify
from torch import nn

import isvit
from isvit.checkpoint import load_quantized, save_quantized
from isvit.errors import IsvitError
from isvit.export import export_onnx, folded_tables, load_onnx
from isvit.modules import QuantLinear, QuantMatMul
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm, placement_for
from isvit.quantizers import Quantizer, UniformQuantizer
from isvit.rotate import is_rotated, rotate_model
from isvit.wrap import Placement, architecture, forward_units, is_block, post_layernorm_pairs, wrap_model

SMALL = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
# NaFlexVit's learned position embedding on the 4 x 4 grid of a 64 x 64 image (as the full-size
# models' 16 x 16 at 256 x 256): NCHW images of that size use it as it is
NAFLEX = {**SMALL, "pos_embed_grid_size": (4, 4)}
MODELS = {
    "aimv2": ("aimv2_large_patch14_224", SMALL),
    "naflex-siglip": ("naflexvit_base_patch16_siglip", NAFLEX),  # attention pool ('map')
    "naflex-gap": ("naflexvit_base_patch16_gap", NAFLEX),  # register tokens, LayerScale, average + fc_norm
}
VARIANTS = {
    **MODELS,
    "aimv2-tower": ("aimv2_large_patch14_224", {**SMALL, "num_classes": 0}),  # how AIMv2 is published
    "naflex-map": ("naflexvit_base_patch16_map", NAFLEX),
    "naflex-token": ("naflexvit_base_patch16_gap", {**NAFLEX, "class_token": True, "global_pool": "token",
                                                    "fc_norm": False}),
    "naflex-conv": ("naflexvit_base_patch16_siglip", {**NAFLEX, "embed_proj_type": "conv"}),
}
NAFLEX_VARIANTS = [v for v in VARIANTS if v.startswith("naflex")]


def small_model(variant: str) -> nn.Module:
    """A random model in which every part counts: norms' gammas and biases, LayerScale at 1, every
    2-d weight at unit gain, position embedding, prefix tokens and the pool's latent query drawn
    at a scale that matters, and a head that spreads the logits."""
    name, args = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "gamma":
                p.fill_(1.0)
            elif leaf in ("pos_embed", "cls_token", "reg_token", "latent"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 1 and "norm" in key:
                p.normal_(1.0, 0.2) if leaf == "weight" else p.normal_(0.0, 0.2)
            elif p.dim() == 1 and leaf == "bias":
                p.normal_(0.0, 0.1)
            elif p.dim() == 2 and leaf == "weight":
                p.normal_(0.0, p.shape[1] ** -0.5)
        if isinstance(model.head, nn.Linear):
            model.head.weight.normal_(0.0, 0.5)
    return model


def images(n: int, seed: int, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


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

@pytest.mark.parametrize("variant", VARIANTS)
def test_disabled_quantizers_give_the_original_output(variant):
    model = small_model(variant)
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    assert architecture(wrapped) == ("vit" if variant.startswith("aimv2") else "naflexvit")
    isvit.set_quantizers(wrapped, False)
    x = images(4, seed=1)
    with torch.no_grad():
        expected = model(x)
        got, units = wrapped(x), x
        for unit in forward_units(wrapped):
            units = unit(units)
    assert expected.std(1).min() > 0.3  # outputs that differ
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(units, expected, atol=1e-5, rtol=1e-5)
    # every Linear is quantized but the attention pool's, which stays float as in the ViT adapter
    assert not any(type(m) is nn.Linear and not n.startswith("attn_pool") for n, m in wrapped.named_modules())
    assert sum(is_block(unit.body) for unit in forward_units(wrapped)) == SMALL["depth"]
    assert sum(isinstance(m, QuantMatMul) for m in wrapped.modules()) == 2 * SMALL["depth"]


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("variant", ["aimv2", "naflex-siglip", "naflex-gap"])
def test_the_post_layernorm_fold_leaves_the_function_unchanged(variant, rotate):
    model = small_model(variant)
    start = copy.deepcopy(model)
    if rotate:
        rotate_model(start)
    wrapped = wrap_model(start, placement_for(isvit.QuantConfig(method="repq", w_bits=8, a_bits=8)))
    calibrate_weights(wrapped)
    calibrate_activations(wrapped, images(8, seed=2))
    isvit.set_quantizers(wrapped, False)
    pairs = post_layernorm_pairs(wrapped)
    fold_post_layernorm(wrapped)
    x = images(4, seed=3)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-4, rtol=1e-4)
    if variant == "aimv2" and not rotate:  # timm's RmsNorm has no bias: qkv and fc1 per tensor, nothing to fold
        assert pairs == []
        assert not any(m.input_quantizer.is_per_channel for m in wrapped.modules() if isinstance(m, QuantLinear)
                       and isinstance(m.input_quantizer, UniformQuantizer))
    else:
        assert len(pairs) == 2 * SMALL["depth"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rotation_is_exact(variant):
    model = small_model(variant).double()
    rotated = copy.deepcopy(model)
    rotate_model(rotated)
    rotated.double()
    assert is_rotated(rotated) and not any(isinstance(m, RmsNorm) for m in rotated.modules())
    x = images(4, seed=10).double()
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(rotated(x), expected, atol=1e-9, rtol=1e-9)
        if variant in NAFLEX_VARIANTS and "conv" not in variant:  # and on a padded NaFlex batch
            batch = naflex_batch(x, 20, seed=11)
            assert torch.allclose(rotated(batch), model(batch), atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Quantized
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["minmax", "repq"])
@pytest.mark.parametrize("variant", MODELS)
def test_w8a8_agrees_with_full_precision(variant, method):
    model = small_model(variant)
    config = isvit.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=16)
    quantized = isvit.quantize(model, images(16, seed=4), config, progress=False)
    x = images(32, seed=5)
    with torch.no_grad():
        assert agreement(quantized(x), model(x)) >= 0.8


@pytest.mark.parametrize("variant", ["naflex-siglip", "naflex-gap", "naflex-map", "naflex-token"])
def test_a_padded_naflex_batch_gives_what_its_images_give(variant):
    """Calibrated on NCHW images only; then a NaFlex dict of the same images' patches, padded with
    random invalid patches, gives their outputs; so does a smaller image (3 x 4 patches) padded
    to the same length. SULQ's lowest level is not 0: without ``attended_keys`` the padding would
    still get weight in the quantized attention."""
    model = small_model(variant)
    config = isvit.QuantConfig(method="repq", w_bits=8, a_bits=8, calib_size=16, softmax_quantizer="sulq")
    quantized = isvit.quantize(model, images(16, seed=4), config, progress=False)
    with torch.no_grad():
        for size, seed in (((64, 64), 12), ((48, 64), 13)):
            x = images(4, seed=seed, size=size)
            expected = quantized(x)
            for length, junk in ((20, 0), (24, 1)):
                got = quantized(naflex_batch(x, length, seed=junk))
                assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (size, length)


def test_the_quantized_attention_honours_a_mask():
    """A block given a key-padding mask: the valid tokens' output is the block's on those tokens alone."""
    model = small_model("naflex-siglip")
    config = isvit.QuantConfig(method="minmax", w_bits=4, a_bits=4, calib_size=8, softmax_quantizer="sulq")
    quantized = isvit.quantize(model, images(8, seed=4), config, progress=False)
    block = quantized.blocks[0]
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(14))
    padded = torch.cat([x, 5 * torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(15))], 1)
    valid = torch.arange(22) < 16
    for mask in (valid.view(1, 1, 1, 22).expand(2, 1, 22, 22),  # boolean, key-only
                 torch.zeros(2, 1, 22, 22).masked_fill_(~(valid[:, None] & valid[None, :]), torch.finfo(torch.float32).min)):
        with torch.no_grad():
            assert torch.allclose(block(padded, attn_mask=mask)[:, :16], block(x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=list(MODELS))
def isvit_w4a4(request):
    """The fast preset at W4/A4 (one iteration per unit), with rotation."""
    variant = request.param
    model = small_model(variant)
    config = isvit.QuantConfig(method="isvit", preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "goes without rotation" warning
        quantized = isvit.quantize(model, images(8, seed=6), config, progress=False)
    return variant, model, quantized, config


def test_isvit_fast_w4a4_rotates_and_gives_finite_logits(isvit_w4a4):
    variant, _, quantized, _ = isvit_w4a4
    assert is_rotated(quantized)
    with torch.no_grad():
        logits = quantized(images(8, seed=7))
        assert logits.shape == (8, 10) and torch.isfinite(logits).all()
        if variant.startswith("naflex"):  # padding-independent after rotation and reconstruction too
            x = images(4, seed=8)
            assert torch.allclose(quantized(naflex_batch(x, 20, seed=2)), quantized(x), atol=1e-5, rtol=1e-5)
    assert all(m.input_quantizer.is_calibrated for m in quantized.modules()
               if isinstance(m, QuantLinear) and isinstance(m.input_quantizer, Quantizer))


def test_checkpoint_reloads_bit_exact(isvit_w4a4, tmp_path):
    variant, _, quantized, config = isvit_w4a4
    name, args = VARIANTS[variant]
    path = tmp_path / f"{variant}.safetensors"
    save_quantized(quantized, path, model_name=name, config=config, data_config={"input_size": [3, 64, 64]},
                   model_args=args)
    rebuilt, _ = load_quantized(path)
    x = images(8, seed=8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), quantized(x))


def test_onnx_export_computes_what_pytorch_computes(isvit_w4a4, tmp_path):
    variant, model, quantized, config = isvit_w4a4
    name, args = VARIANTS[variant]
    path = tmp_path / f"{variant}.onnx"
    data_config = isvit.resolve_data_config(model, input_size=SMALL["img_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = export_onnx(quantized, path, model_name=name, config=config, data_config=data_config, model_args=args)
    # every quantized Linear and product is an integer product; only the patch embedding (on the
    # float image) is a float product
    layers = sum(isinstance(m, (QuantLinear, QuantMatMul)) for m in quantized.modules())
    assert counts["integer"] >= layers - 1 and counts["float"] == 1
    onnx_model, _ = load_onnx(path, threads=1)
    x = images(16, seed=9)
    with torch.no_grad(), folded_tables(quantized):
        expected, fp = quantized(x), model(x)
        got = onnx_model(x)
    assert got.shape == (16, 10)
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 15
    assert (got - expected).abs().mean() <= 0.5 * (expected - fp).abs().mean()


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
    with pytest.raises(IsvitError, match=message) as error:
        isvit.quantize(model, images(4, seed=1), isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8), progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(IsvitError, match=message):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (QuantLinear, QuantMatMul)) for m in model.modules())


def test_rotation_refuses_mixed_norms_before_any_change():
    model = small_model("aimv2")
    model.blocks[1].norm2 = nn.LayerNorm(32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IsvitError, match="blocks.1.norm2 is a LayerNorm; rotation needs a RmsNorm there"):
        rotate_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
