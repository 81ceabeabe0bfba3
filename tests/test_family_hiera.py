"""Hiera and SAM 2's Hiera (timm ``Hiera``, ``HieraDet``): small random models through every method.

The small models keep what the full-size ones have: Hiera's mask-unit attention without and with q
pooling, global attention without and with it, stage transitions with the block's dim-changing
``proj`` (or, abs-win, without it: the stream itself max- and average-pooled) and LayerScale; HieraDet's
windowed attention (a 16 x 16 grid in windows of 4, an 8 x 8 grid padded to windows of 6), q pooling
by MaxPool2d, a global block and the classifier or none (SAM 2's feature extractor, ``num_classes=0``).

Per model: the wrapped model with every quantizer off is the original, through ``model(x)`` and
through its units in order; the post-LayerNorm fold leaves the function unchanged (only the exact
pairs are folded); minmax and repq at W8/A8 agree with full precision on most of a batch; the isvit
fast preset at W4/A4 runs (rotation refused in one sentence, the preset warns and goes without); a
saved checkpoint reloads bit-exact; the ONNX export computes what PyTorch computes; what the adapters
cannot carry is refused in one sentence before any module is swapped.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch

import isvit
from isvit.checkpoint import load_quantized, save_quantized
from isvit.errors import IsvitError
from isvit.export import export_onnx, folded_tables, load_onnx
from isvit.modules import QuantLinear, QuantMatMul
from isvit.pipeline import calibrate_activations, calibrate_weights, fold_post_layernorm, placement_for
from isvit.rotate import rotate_model
from isvit.wrap import Placement, architecture, forward_units, is_block, post_layernorm_pairs, wrap_model

IMG = 64
HIERA = {"img_size": (IMG, IMG), "embed_dim": 16, "num_heads": 1, "stages": (1, 2, 2, 1), "num_classes": 10}
# 16 x 16 tokens in 4 windows of 4 x 4, then 8 x 8 padded to windows of 6, 4 x 4 global, 2 x 2
HIERADET = {"embed_dim": 16, "num_heads": 1, "stages": (1, 2, 2, 1), "window_spec": (4, 6, 2, 1),
            "global_att_blocks": (4,), "num_classes": 10}
VARIANTS = {
    "hiera": ("hiera_tiny_224", HIERA),
    # LayerScale, the abs-win position embedding, no proj at the stage transitions
    "hiera-abswin": ("hiera_small_abswin_256", {**HIERA, "global_pos_size": (8, 8)}),
    "hieradet": ("sam2_hiera_tiny", HIERADET),
    "hieradet-features": ("sam2_hiera_tiny", {**HIERADET, "num_classes": 0}),
}
ROTATION_REFUSED = "rotation supports ViT/DeiT.* models"


def runs_with(name: str):
    """Skipped where the installed timm lacks the model (timm 1.0.3 has neither abs-win Hiera nor HieraDet)."""
    return pytest.mark.skipif(not timm.is_model(name), reason=f"this timm has no {name}")


def variants(*names: str) -> list:
    return [pytest.param(v, marks=runs_with(VARIANTS[v][0])) for v in names]


CLASSIFIERS = variants("hiera", "hiera-abswin", "hieradet")
EVERY = variants(*VARIANTS)


def small_model(variant: str) -> torch.nn.Module:
    """A random model in which every part counts: timm's initialisation leaves the head near zero,
    LayerScale at 1e-5 and the position embeddings small; all are redrawn, the norms' affines and
    every bias too, and every Linear and the patch embedding get weights of unit gain."""
    name, args = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "gamma":
                p.fill_(1.0)
            elif key.startswith("pos_embed"):
                p.normal_(0.0, 0.5)
            elif "norm" in key:
                p.normal_(1.0 if leaf == "weight" else 0.0, 0.2)
            elif leaf == "weight":
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif leaf == "bias":
                p.normal_(0.0, 0.1)
        if isinstance(model.head.fc, torch.nn.Linear):
            model.head.fc.weight.normal_(0.0, 0.5)
    return model


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


@pytest.mark.parametrize("variant", EVERY)
def test_disabled_quantizers_give_the_original_outputs(variant):
    model = small_model(variant)
    assert architecture(model) == ("hieradet" if variant.startswith("hieradet") else "hiera")
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    x = images(4, seed=1)
    with torch.no_grad():
        expected = model(x)
        got, units = wrapped(x), x
        for unit in forward_units(wrapped):
            units = unit(units)
    assert expected.std(1).min() > 0.5  # outputs that differ
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(units, expected, atol=1e-5, rtol=1e-5)
    # every Linear is quantized (qkv, proj, the blocks' dim-changing proj, fc1, fc2, head), and both
    # products of every attention
    assert not any(type(m) is torch.nn.Linear for m in wrapped.modules())
    blocks = sum(is_block(unit.body) for unit in forward_units(wrapped))
    assert blocks == len(model.blocks) == 6
    assert sum(isinstance(m, QuantMatMul) for m in wrapped.modules()) == 2 * blocks
    expanding = sum(isinstance(getattr(b, "proj", None), QuantLinear) for b in wrapped.blocks)
    assert expanding == (0 if variant == "hiera-abswin" else 3)


@runs_with("sam2_hiera_tiny")
def test_sam2_multi_scale_features_come_from_the_quantized_blocks():
    """SAM 2 reads the stage ends (``forward_intermediates``): the wrapped model's, quantizers off,
    are the original's; on, they differ."""
    model = small_model("hieradet-features")
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    x = images(2, seed=1)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        got = wrapped.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1:] for f in got] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
    assert all(torch.allclose(g, e, atol=1e-5, rtol=1e-5) for g, e in zip(got, expected))


@pytest.mark.parametrize("variant", EVERY)
def test_the_post_layernorm_fold_leaves_the_function_unchanged(variant):
    model = small_model(variant)
    wrapped = wrap_model(copy.deepcopy(model), placement_for(isvit.QuantConfig(method="repq", w_bits=8, a_bits=8)))
    calibrate_weights(wrapped)
    calibrate_activations(wrapped, images(8, seed=2))
    isvit.set_quantizers(wrapped, False)
    fold_post_layernorm(wrapped)
    x = images(4, seed=3)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-4, rtol=1e-4)
    # norm2 -> fc1 in every block; norm1 -> qkv where norm1 feeds qkv alone (Hiera: no proj;
    # HieraDet: the global block that keeps its width, windows pad with zeros)
    names = [name for name, _, _ in post_layernorm_pairs(wrapped)]
    norm1 = {"hiera": [0, 2, 4], "hiera-abswin": [0, 1, 2, 3, 4, 5], "hieradet": [4], "hieradet-features": [4]}[variant]
    expected = sorted([f"blocks.{i}.norm1" for i in norm1] + [f"blocks.{i}.norm2" for i in range(6)])
    assert names == expected


@pytest.mark.parametrize("method", ["minmax", "repq"])
@pytest.mark.parametrize("variant", CLASSIFIERS)
def test_w8a8_agrees_with_full_precision(variant, method):
    model = small_model(variant)
    config = isvit.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=16)
    quantized = isvit.quantize(model, images(16, seed=4), config, progress=False)
    x = images(32, seed=5)
    with torch.no_grad():
        assert agreement(quantized(x), model(x)) >= 0.8


@runs_with("sam2_hiera_tiny")
def test_w8a8_features_of_sam2s_encoder_stay_close():
    model = small_model("hieradet-features")
    config = isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=16)
    quantized = isvit.quantize(model, images(16, seed=4), config, progress=False)
    x = images(16, seed=5)
    with torch.no_grad():
        fp, q = model(x), quantized(x)
    assert q.shape == fp.shape == (16, 128)
    assert (q - fp).abs().mean() < 0.1 * fp.std()


@pytest.mark.parametrize("variant", variants("hiera", "hieradet"))
def test_rotation_is_refused_in_one_sentence_before_any_change(variant):
    model = small_model(variant)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IsvitError, match=f"{ROTATION_REFUSED}, not Hiera.*per-channel maximum does not commute"):
        rotate_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module", params=CLASSIFIERS)
def isvit_w4a4(request):
    """The fast preset at W4/A4 (one iteration per unit): it warns that it goes without rotation."""
    variant = request.param
    model = small_model(variant)
    config = isvit.QuantConfig(method="isvit", preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with pytest.warns(UserWarning, match=ROTATION_REFUSED):
        quantized = isvit.quantize(model, images(8, seed=6), config, progress=False)
    return variant, model, quantized, config


def test_isvit_fast_w4a4_gives_finite_logits(isvit_w4a4):
    _, _, quantized, _ = isvit_w4a4
    with torch.no_grad():
        logits = quantized(images(8, seed=7))
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    assert all(m.input_quantizer.is_calibrated for m in quantized.modules() if isinstance(m, QuantLinear))


def test_checkpoint_reloads_bit_exact(isvit_w4a4, tmp_path):
    variant, _, quantized, config = isvit_w4a4
    name, args = VARIANTS[variant]
    path = tmp_path / f"{variant}.safetensors"
    save_quantized(quantized, path, model_name=name, config=config, data_config={"input_size": [3, IMG, IMG]},
                   model_args=args)
    rebuilt, _ = load_quantized(path)
    x = images(8, seed=8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), quantized(x))


def test_onnx_export_computes_what_pytorch_computes(isvit_w4a4, tmp_path):
    variant, model, quantized, config = isvit_w4a4
    name, args = VARIANTS[variant]
    path = tmp_path / f"{variant}.onnx"
    data_config = isvit.resolve_data_config(model, input_size=IMG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = export_onnx(quantized, path, model_name=name, config=config, data_config=data_config, model_args=args)
    # every quantized Linear and product is an integer product; only the patch embedding (on the
    # float image) is a float convolution
    layers = sum(isinstance(m, (QuantLinear, QuantMatMul)) for m in quantized.modules())
    assert counts["integer"] >= layers and counts["float"] == 1
    onnx_model, _ = load_onnx(path, threads=1)
    x = images(16, seed=9)
    with torch.no_grad(), folded_tables(quantized):
        expected, fp = quantized(x), model(x)
        got = onnx_model(x)
    assert got.shape == (16, 10)
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 15
    assert (got - expected).abs().mean() <= 0.5 * (expected - fp).abs().mean()


REFUSED = {
    "hiera-rmsnorm": ("hiera_tiny_224", {**HIERA, "norm_layer": "rmsnorm"}, r"blocks.0.norm1 is a RmsNorm"),
    "hieradet-rmsnorm": ("sam2_hiera_tiny", {**HIERADET, "norm_layer": "rmsnorm"}, r"blocks.0.norm1 is a RmsNorm"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=runs_with(REFUSED[c][0])) for c in REFUSED])
def test_what_an_adapter_cannot_carry_is_one_sentence_before_any_change(case):
    name, args, message = REFUSED[case]
    model = timm.create_model(name, pretrained=False, **args).eval()
    with pytest.raises(IsvitError, match=message):
        isvit.quantize(model, images(4, seed=1), isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8), progress=False)
    with pytest.raises(IsvitError, match=message):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (QuantLinear, QuantMatMul)) for m in model.modules())


@pytest.mark.skipif(not hasattr(timm.layers, "ClNormMlpClassifierHead"), reason="timm before 1.0.9")
def test_a_head_with_a_hidden_layer_is_refused_before_any_change():
    model = small_model("hiera")
    model.head = timm.layers.ClNormMlpClassifierHead(128, 10, hidden_size=32, input_fmt="NLC")
    with pytest.raises(IsvitError, match="the head has a hidden layer"):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (QuantLinear, QuantMatMul)) for m in model.modules())
