"""Rotation (isvit.rotate, ``RepqConfig(rotate=True)``): the full-precision function is unchanged
on small random ViT/DeiT/Swin variants and on the real ViT-Ti, the rotations are orthogonal
(randomized Hadamard where one is known), the per-head rotations keep q k^T and attn @ v, the real
model's residual stream loses its outlier channels, and a rotated model quantizes, folds exactly,
reloads bit-exactly from its checkpoint and exports to ONNX."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import onnx
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import RmsNorm, SwiGLU
from torch import nn

import isvit
from isvit import cli
from isvit.checkpoint import load_quantized, save_quantized
from isvit.errors import IsvitError
from isvit.export import export_onnx, folded_tables, load_onnx
from isvit.modules import Unrotate
from isvit.pipeline import fold_post_layernorm
from isvit.rotate import RMSNorm, RotatedLayerNorm, hadamard, random_orthogonal, rotate_heads, rotate_model

from conftest import (
    CALIB_DIR,
    SMALL_SWIN,
    SMALL_VIT,
    VAL_DIR,
    VIT_TINY_WEIGHTS,
    agreement,
    calibrated,
    logits,
    method_config,
    random_images,
    small_swin,
    small_vit,
)

# The VisionTransformer variants timm builds, small: 32x32 images of 16 patches, width 32, 2 blocks
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


def tiny_vit(name: str = "vit_tiny_patch16_224", **overrides) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**TINY_VIT, **overrides}).eval()


# Small random models; each is given LayerNorm affines, Linear biases and stream means (trained_like)
VARIANTS = {
    "vit": lambda: small_vit(),
    "vit-reg-tokens-avg-pool": lambda: small_vit(reg_tokens=2, global_pool="avg", fc_norm=True),
    "vit-layer-scale-no-embed-class": lambda: small_vit(init_values=0.1, no_embed_class=True),
    "vit-qk-norm": lambda: small_vit(qk_norm=True),
    "deit-distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2,
                                                img_size=64, num_classes=10).eval(),
    "swin": lambda: small_swin(),
    "swin-padded-windows": lambda: small_swin(window_size=6),
    # norm_pre: a LayerNorm whose output is the stream (CLIP's vision tower)
    "clip": lambda: tiny_vit("vit_base_patch16_clip_224"),
    "vit-pre-norm-qk-norm": lambda: tiny_vit(pre_norm=True, qk_norm=True),
    # attention-pool head (SigLIP's: global_pool='map', no class token)
    "siglip": lambda: tiny_vit("vit_base_patch16_siglip_224"),
    "siglip-reg-tokens-qk-norm": lambda: tiny_vit("vit_base_patch16_siglip_224", reg_tokens=4, qk_norm=True),
    "vit-map-fc-norm": lambda: tiny_vit(global_pool="map", fc_norm=True),  # the pool reads the stream raw
    "vit-layer-scale": lambda: tiny_vit(init_values=1e-1),
    "vit-reg-tokens": lambda: tiny_vit(reg_tokens=4),
    "vit-no-class-token-avg": lambda: tiny_vit(class_token=False, global_pool="avg"),  # fc_norm after pooling
    "vit-no-class-token-avg-norm": lambda: tiny_vit(class_token=False, global_pool="avg", fc_norm=False),
    "vit-fc-norm": lambda: tiny_vit(fc_norm=True),  # class token, then fc_norm
    "vit-no-embed-class": lambda: tiny_vit(no_embed_class=True),
    "vit-dynamic-img-size": lambda: tiny_vit(dynamic_img_size=True),
    "vit-no-final-norm": lambda: tiny_vit(final_norm=False, init_values=1e-1, reg_tokens=2, no_embed_class=True),
    "vit-patch-embed-norm": lambda: tiny_vit(embed_norm_layer=nn.LayerNorm),
    "vit-attn-and-mlp-norms": lambda: tiny_vit(scale_attn_norm=True, scale_mlp_norm=True, global_pool="avg"),
}
# Where a reader takes the stream without a LayerNorm (the head, or the attention pool's kv), its
# mean matters: the stream is not centred and its LayerNorms become RotatedLayerNorms, as in Swin
UNCENTRED = {"vit-map-fc-norm", "vit-no-final-norm"}
# Where a LayerNorm's output is the stream itself
STREAM_FROM_NORM = {"clip": "norm_pre", "vit-pre-norm-qk-norm": "norm_pre", "vit-patch-embed-norm": "patch_embed.norm"}


def input_size(model: nn.Module) -> int:
    return model.patch_embed.img_size[0]


@torch.no_grad()
def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A random timm model has LayerNorms of weight 1 and bias 0, zero biases and streams of mean
    near 0, under which the affine fold and the centring would go untested: random LayerNorm
    affines, biases, and a random row added to every Linear's rows (so that each writer adds a
    token-dependent mean to the stream)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.mul_(torch.exp(0.5 * torch.randn(m.weight.shape, generator=g)))
            m.bias.add_(0.5 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.Linear):
            m.weight.add_(0.05 * torch.randn(1, m.in_features, generator=g))
            if m.bias is not None:
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=g))
    for name in ("cls_token", "dist_token", "reg_token"):
        if isinstance(getattr(model, name, None), nn.Parameter):
            getattr(model, name).add_(torch.randn(getattr(model, name).shape, generator=g))
    return model


@torch.no_grad()
def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """``trained_like``, then every parameter moved away from its initial value (LayerScale's
    constant gamma, zero biases, position embeddings, the attention pool's latent query ...) and the
    classifier scaled so that the logits are about 2: nothing the rotation gets wrong can hide."""
    trained_like(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        scale = p.abs().mean().clamp(min=0.1)
        p.add_(0.3 * scale * torch.randn(p.shape, generator=g))
    # the classifier (its last Linear) scaled so that the largest logit on two images is 2
    scale = 2 / model(random_images(2, seed=0, size=input_size(model))).abs().max()
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        head = getattr(head, "fc", head)  # Swin's ClassifierHead
        if isinstance(head, nn.Linear):
            head.weight.mul_(scale)
            head.bias.mul_(scale)
    return model


def blocks_of(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [block for stage in model.layers for block in stage.blocks]


@torch.no_grad()
def run_with_block_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, the input tokens of every transformer block)."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in blocks_of(model)]
    try:
        return model(x), seen
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# The matrices
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 40, 96, 192, 384, 768])
def test_hadamard_matrices(n):
    h = hadamard(n)
    assert h.shape == (n, n) and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 7, 28, 100])
def test_no_hadamard_matrix_where_none_is_built(n):
    assert hadamard(n) is None


@pytest.mark.parametrize("n", [96, 192, 64, 100, 7])
def test_random_rotations_are_orthogonal_and_hadamard_where_possible(n):
    q = random_orthogonal(n, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    is_hadamard = bool(torch.allclose(q.abs(), torch.full_like(q, n ** -0.5), atol=1e-15))
    assert is_hadamard == (n in (96, 192, 64))  # 96 = 8 * 12, 192 = 16 * 12, 64 = 2^6
    assert torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(0)))
    assert not torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(1)))


# ---------------------------------------------------------------------------------------------
# The full-precision function
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_full_precision_function_is_unchanged(variant):
    model = perturbed(VARIANTS[variant]())
    rotated = copy.deepcopy(model)
    rotations = rotate_model(rotated, seed=0)
    x = random_images(4, seed=1, size=input_size(model))
    before, inputs = run_with_block_inputs(model, x)
    after, rotated_inputs = run_with_block_inputs(rotated, x)
    # measured: logits up to 1.9 to 3.7 change by 1.8e-7 to 2.5e-6 at most (centring a Swin's stream
    # instead changes them by 20 %)
    assert before.abs().max() > 0.3
    assert (after - before).abs().max().item() < 1e-4
    if getattr(model, "dynamic_img_size", False):  # another image size: the position embedding resampled
        other = random_images(2, seed=2, size=48)[..., :40]
        with torch.no_grad():
            assert (rotated(other) - model(other)).abs().max().item() < 1e-4
    # what each block reads is the stream rotated: ViT's centred first (unless a reader needs its
    # mean), Swin's stage 0 left as it is
    swin, centred = variant.startswith("swin"), not variant.startswith("swin") and variant not in UNCENTRED
    if swin:
        stage_of = [i for i, stage in enumerate(rotated.layers) for _ in stage.blocks]
        expected = [t if i == 0 else t @ rotations[f"layers.{i}"].float() for t, i in zip(inputs, stage_of)]
        assert list(rotations) == ["layers.1"]
    else:
        q = rotations["stream"].float()
        expected = [((t - t.mean(dim=-1, keepdim=True)) if centred else t) @ q for t in inputs]
    for got, want in zip(rotated_inputs, expected):
        assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert not torch.allclose(rotated_inputs[-1], inputs[-1], atol=1e-2)  # it really is rotated
    # every LayerNorm on the stream is gone (the ones on q and k, in an attention's output, in an
    # MLP's hidden layer, in the attention pool stay); the new norms start at weight 1 (their bias
    # is 0 but where a block pads its windows)
    norms = [m for m in rotated.modules() if isinstance(m, RMSNorm)]
    rotated_blocks = len(blocks_of(model)) - (len(model.layers[0].blocks) if swin else 0)
    head_norm = swin or any(isinstance(getattr(model, n, None), nn.LayerNorm) for n in ("norm", "fc_norm"))
    if isinstance(getattr(model, "attn_pool", None), nn.Module):  # fc_norm reads the pool's output
        head_norm = isinstance(model.norm, nn.LayerNorm)
    assert len(norms) == 2 * rotated_blocks + head_norm
    assert all(isinstance(n, RotatedLayerNorm) == (not centred) for n in norms)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    assert sum(not torch.equal(n.bias, torch.zeros_like(n.bias)) for n in norms) == (2 if "padded" in variant else 0)
    # a LayerNorm whose output is the stream itself (norm_pre, the patch embedding's) keeps its
    # normalisation; its affine becomes a Linear that writes the rotated stream
    if variant in STREAM_FROM_NORM:
        norm, linear = rotated.get_submodule(STREAM_FROM_NORM[variant])
        assert type(norm) is nn.LayerNorm and not norm.elementwise_affine and type(linear) is nn.Linear


# Feature towers (num_classes=0, no Linear reads the stream at the end): (timm name, arguments)
TOWER_ARGS = {**TINY_VIT, "num_classes": 0}
TOWERS = {
    "vit-token": ("vit_tiny_patch16_224", TOWER_ARGS),
    # norm is Identity: fc_norm after pooling, so forward_features is the stream itself (not centred)
    "vit-avg-fc-norm": ("vit_tiny_patch16_224", {**TOWER_ARGS, "class_token": False, "global_pool": "avg"}),
    # registers, LayerScale, no position embedding on the class token, dynamic image size
    "dinov2-reg-tokens": ("vit_small_patch14_reg4_dinov2", TOWER_ARGS),
    "clip": ("vit_base_patch16_clip_224", TOWER_ARGS),  # norm_pre
    "siglip": ("vit_base_patch16_siglip_224", TOWER_ARGS),  # the attention pool after norm
    "vit-no-final-norm": ("vit_tiny_patch16_224", {**TOWER_ARGS, "final_norm": False, "init_values": 0.1}),
    "vit-max-pool": ("vit_tiny_patch16_224", {**TOWER_ARGS, "global_pool": "max"}),  # refused with a classifier
    "deit-distilled": ("deit_tiny_distilled_patch16_224", TOWER_ARGS),
    "swin": (SMALL_SWIN[0], {**SMALL_SWIN[1], "num_classes": 0}),
}


def tower(variant: str) -> nn.Module:
    name, args = TOWERS[variant]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **args).eval()


@pytest.mark.parametrize("variant", TOWERS)
def test_a_feature_tower_gives_the_unrotated_models_features(variant):
    """Rotated inside, the rotation undone right after the final norm: the pooled features and
    forward_features (every token after the norm) are the unrotated model's."""
    model = perturbed(tower(variant))
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    x = random_images(4, seed=1, size=input_size(model))
    with torch.no_grad():
        for forward in ("forward", "forward_features"):
            before, after = getattr(model, forward)(x), getattr(rotated, forward)(x)
            assert before.shape == after.shape and before.abs().max() > 0.3
            # measured: 1e-7 to 9e-7 of the largest feature
            assert (after - before).abs().max() <= 1e-5 * before.abs().max(), forward
    _, inputs = run_with_block_inputs(model, x)
    _, rotated_inputs = run_with_block_inputs(rotated, x)
    assert not torch.allclose(rotated_inputs[-1], inputs[-1], atol=1e-2)  # the stream inside is rotated
    assert any(isinstance(m, RMSNorm) for m in rotated.modules())
    # one Unrotate, in norm's place: after the norm's normalisation, or alone where norm was Identity
    final_norm = isinstance(model.norm, nn.LayerNorm)
    unrotates = [n for n, m in rotated.named_modules() if isinstance(m, Unrotate)]
    assert unrotates == (["norm.1"] if final_norm else ["norm"])
    if final_norm:
        assert isinstance(rotated.norm[0], RMSNorm)  # RotatedLayerNorm where the stream is not centred (Swin)


def test_per_head_rotations_keep_q_k_and_attn_v():
    attn = trained_like(small_vit()).blocks[0].attn
    rotated = copy.deepcopy(attn)
    rotate_heads(rotated, torch.Generator().manual_seed(0))
    x = torch.randn(2, 17, 192, generator=torch.Generator().manual_seed(1))

    def parts(a):
        q, k, v = a.qkv(x).reshape(2, 17, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    with torch.no_grad():
        (q, k, v), (q2, k2, v2) = parts(attn), parts(rotated)
        assert (q2 - q).abs().max() > 0.1 and (v2 - v).abs().max() > 0.1
        assert torch.allclose(q2 @ k2.transpose(-2, -1), q @ k.transpose(-2, -1), atol=1e-4)
        p = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        assert not torch.allclose(p @ v2, p @ v, atol=1e-2)
        heads = (p @ v).transpose(1, 2).reshape(2, 17, 192)
        heads2 = (p @ v2).transpose(1, 2).reshape(2, 17, 192)
        assert torch.allclose(rotated.proj(heads2), attn.proj(heads), atol=1e-5)
        assert torch.allclose(rotated(x), attn(x), atol=1e-5)


def test_normalised_q_and_k_are_left_alone():
    attn = small_vit(qk_norm=True).blocks[0].attn
    rotated = copy.deepcopy(attn)
    rotate_heads(rotated, torch.Generator().manual_seed(0))
    rows = attn.qkv.out_features // 3
    assert torch.equal(rotated.qkv.weight[: 2 * rows], attn.qkv.weight[: 2 * rows])  # q and k as they were
    assert not torch.equal(rotated.qkv.weight[2 * rows:], attn.qkv.weight[2 * rows:])  # v rotated


@pytest.fixture(scope="module")
def real_rotated(real_vit, calib32):
    """(logits, block inputs) of the real ViT-Ti and of its rotated copy on 8 calibration images."""
    rotated = copy.deepcopy(real_vit)
    rotate_model(rotated, seed=0)
    x = calib32[:8]
    return run_with_block_inputs(real_vit, x), run_with_block_inputs(rotated, x)


@pytest.mark.real
def test_real_vit_full_precision_logits_are_unchanged(real_rotated):
    (before, _), (after, _) = real_rotated
    # measured: max |change| 2.1e-5 on logits up to 18.6 (1.1e-6 of them)
    assert before.abs().max() > 10
    assert (after - before).abs().max().item() < 1e-4
    assert torch.equal(after.argmax(1), before.argmax(1))


def peak_ratio(tokens: torch.Tensor) -> float:
    """The largest channel peak over the median channel peak (peaks over images and tokens)."""
    peaks = tokens.abs().amax(dim=(0, 1))
    return (peaks.max() / peaks.median()).item()


@pytest.mark.real
def test_real_vit_residual_stream_loses_its_outlier_channels(real_rotated):
    # ViT-Ti (AugReg) on 8 calibration images, block inputs 0..11, measured:
    #   before 3.1 3.0 4.3 5.5 4.8 5.2 4.3 4.3 112.6 109.7 106.9 101.9
    #   after  1.7 1.6 1.6 1.4 1.6 1.7 1.6 2.1 1.5 1.5 1.5 1.5
    (_, inputs), (_, rotated_inputs) = real_rotated
    before = [peak_ratio(t) for t in inputs]
    after = [peak_ratio(t) for t in rotated_inputs]
    assert max(before) > 50 and max(after) < 3
    assert all(a < b for a, b in zip(after, before))


# ---------------------------------------------------------------------------------------------
# Quantizing a rotated model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_the_post_layernorm_fold_stays_exact_on_a_rotated_model(arch):
    """As test_reparam's checks, on RMSNorm / RotatedLayerNorm: the fold keeps the full-precision
    and the activation-quantized function (``calibrated`` spreads the norms' per-channel affines)."""
    model = trained_like(small_vit() if arch == "vit" else small_swin())
    rotate_model(model)
    model = calibrated(model)
    x = random_images(8, seed=2)
    fp_before, q_before = logits(model, x, "none"), logits(model, x, "activation")
    assert (q_before - fp_before).abs().max() > 1e-2  # the activation quantization does matter
    fold_post_layernorm(model)
    fp_after, q_after = logits(model, x, "none"), logits(model, x, "activation")
    scale = q_before.abs().max().item()
    assert (fp_after - fp_before).abs().max().item() <= 1e-4 * scale
    assert (q_after - q_before).abs().max().item() <= 1e-4 * scale


ARCHITECTURES = {"vit": SMALL_VIT, "swin": SMALL_SWIN}


@pytest.mark.parametrize("method", ["isvit", "repq"])
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_rotated_model_quantizes_and_reloads_bit_exactly(tmp_path, arch, method):
    name, args = ARCHITECTURES[arch]
    config = method_config(method=method, w_bits=4, a_bits=4, calib_size=8, rotate=True, iters=1 if method == "isvit" else None, batch_size=8 if method == "isvit" else None)
    model = trained_like(small_vit() if arch == "vit" else small_swin())
    qmodel = isvit.quantize(model, random_images(8, seed=1), config, progress=False)
    assert not any(isinstance(m, RMSNorm) for m in model.modules())  # the caller's model is not touched
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name=name, config=config, data_config={"input_size": [3, 64, 64]}, model_args=args)
    rebuilt, info = load_quantized(path)
    assert info["config"].rotate is True
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in qmodel.modules()]
    x = random_images(4, seed=2)
    with torch.no_grad():
        got, expected = rebuilt(x), qmodel(x)
    assert torch.isfinite(expected).all() and torch.equal(got, expected)


TIMM_NAMES = {"clip": "vit_base_patch16_clip_224", "siglip": "vit_base_patch16_siglip_224"}


def quantized_with_the_fast_presets_rotation(model, size: int):
    """(config, model quantized by it): the fast preset at W4/A4 (one iteration per unit), which must
    rotate ``model`` without warning that it goes without."""
    config = isvit.IsvitConfig.from_preset(preset="fast", w_bits=4, a_bits=4, iters=1, calib_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = isvit.quantize(model, random_images(8, seed=1, size=size), config, progress=False)
    assert not [w for w in caught if "rotation" in str(w.message)]
    return config, qmodel


@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_clip_and_siglip_quantize_with_the_fast_presets_rotation_and_reload(tmp_path, variant):
    """The fast preset's default (rotation at <= 4 bits) on CLIP's and SigLIP's towers: rotated,
    not skipped, finite logits, and rebuilt from the checkpoint bit-exactly (the rotation rerun on
    random weights gives the same modules: norm_pre's Linear, the attention pool's kv)."""
    model = perturbed(VARIANTS[variant]())
    size = input_size(model)
    config, qmodel = quantized_with_the_fast_presets_rotation(model, size)
    assert any(isinstance(m, RMSNorm) for m in qmodel.modules())
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name=TIMM_NAMES[variant], config=config,
                   data_config={"input_size": [3, size, size]}, model_args=TINY_VIT)
    rebuilt, _ = load_quantized(path)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in qmodel.modules()]
    x = random_images(4, seed=2, size=size)
    with torch.no_grad():
        got, expected = rebuilt(x), qmodel(x)
    assert torch.isfinite(expected).all() and torch.equal(got, expected)


@pytest.mark.parametrize("variant", ["siglip", "siglip-reg-tokens-qk-norm"])
def test_rotated_w8a8_minmax_agrees_with_full_precision(variant):
    """The classifier is shifted and scaled first so that its logits vary from image to image (a
    random ViT's pooled features differ little between noise images) and argmax means something.
    (The class-token models' features vary too little for this: 0.4 to 3 % of their size.)"""
    model = perturbed(VARIANTS[variant]())
    size = input_size(model)
    calib, x = random_images(16, seed=1, size=size), random_images(32, seed=2, size=size)
    with torch.no_grad():
        out = model(calib)
        model.head.bias.sub_(out.mean(0))
        scale = 1 / (out - out.mean(0)).std()
        model.head.weight.mul_(scale)
        model.head.bias.mul_(scale)
    config = isvit.MinmaxConfig(w_bits=8, a_bits=8, calib_size=16, rotate=True)
    qmodel = isvit.quantize(model, calib, config, progress=False)
    assert any(isinstance(m, RMSNorm) for m in qmodel.modules())
    with torch.no_grad():
        got, expected = qmodel(x), model(x)
    assert expected.argmax(1).unique().numel() >= 5
    # measured: 31 of 32 in both
    assert agreement(got, expected) >= 0.9


def test_a_checkpoint_written_before_rotation_existed_still_loads(tmp_path):
    config = isvit.MinmaxConfig(w_bits=8, a_bits=8, calib_size=4)
    qmodel = isvit.quantize(small_vit(), random_images(4, seed=1), config, progress=False)
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name=SMALL_VIT[0], config=config, data_config={"input_size": [3, 64, 64]},
                   model_args=SMALL_VIT[1])
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    old = json.loads(metadata["config"])
    del old["rotate"]
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(old)})
    rebuilt, info = load_quantized(path)
    assert info["config"].rotate is False
    with torch.no_grad():
        assert torch.equal(rebuilt(random_images(2, seed=2)), qmodel(random_images(2, seed=2)))


def test_exported_rotated_model_computes_what_pytorch_computes(tmp_path):
    """ONNX carries the rotation: RMSNorm is plain arithmetic; the tolerance of test_export.py."""
    args = {"depth": 1, "img_size": 64, "num_classes": 10}
    config = isvit.RepqConfig(w_bits=8, a_bits=8, calib_size=16, rotate=True)
    fp = trained_like(timm.create_model(SMALL_VIT[0], pretrained=False, **args).eval())
    qmodel = isvit.quantize(fp, random_images(16, seed=1), config, progress=False)
    path = tmp_path / "rotated.onnx"
    export_onnx(qmodel, path, model_name=SMALL_VIT[0], config=config, data_config=isvit.resolve_data_config(fp, input_size=64),
                model_args=args)
    assert "LayerNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    onnx_model, info = load_onnx(path, threads=1)
    assert info["config"].rotate is True
    x = random_images(16, seed=3)
    with torch.no_grad(), folded_tables(qmodel):  # what the file computes (its 8-bit re-expressions)
        expected, reference = qmodel(x), fp(x)
    got = onnx_model(x)
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 15
    assert (got - expected).abs().mean() <= 0.5 * (expected - reference).abs().mean()


@pytest.mark.parametrize("variant", ["dinov2-reg-tokens", "vit-avg-fc-norm", "swin"])
def test_a_feature_tower_quantizes_with_the_fast_presets_rotation_reloads_and_exports(tmp_path, variant):
    """The fast preset's default at 4 bits rotates a feature tower (no fallback, no warning); the
    checkpoint rebuilds it bit-exactly (the Unrotate's weight comes from the file), and ``isvit
    export`` of that file runs in onnxruntime within test_export.py's tolerance."""
    model = perturbed(tower(variant))
    size = input_size(model)
    config, qmodel = quantized_with_the_fast_presets_rotation(model, size)
    assert any(isinstance(m, Unrotate) for m in qmodel.modules())
    name, args = TOWERS[variant]
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name=name, config=config,
                   data_config=isvit.resolve_data_config(model, input_size=size), model_args=args)
    rebuilt, info = load_quantized(path)
    assert info["config"].rotate is True
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in qmodel.modules()]
    x = random_images(8, seed=2, size=size)
    with torch.no_grad():
        for forward in ("forward", "forward_features"):
            got, expected = getattr(rebuilt, forward)(x), getattr(qmodel, forward)(x)
            assert torch.isfinite(expected).all() and torch.equal(got, expected)
        reference = model(x)
    onnx_path = tmp_path / "q.onnx"
    assert cli.main(["export", "--quantized", str(path), "--onnx", str(onnx_path), "--threads", "1"]) == 0
    onnx_model, _ = load_onnx(onnx_path, threads=1)
    with torch.no_grad(), folded_tables(rebuilt):  # what the file computes (its 8-bit re-expressions)
        expected = rebuilt(x)
    got = onnx_model(x)
    assert got.shape == reference.shape
    assert (got - expected).abs().mean() <= 0.5 * (expected - reference).abs().mean()


# ---------------------------------------------------------------------------------------------
# Config, command line, refusals
# ---------------------------------------------------------------------------------------------

def test_config_carries_rotate():
    assert isvit.RepqConfig().rotate is False and isvit.MinmaxConfig().rotate is False  # the peers: off
    assert isvit.IsvitConfig().rotate is None and isvit.IsvitConfig().wants_rotation() is False  # the paper preset
    for method in isvit.METHODS:
        assert method_config(method=method, rotate=True).to_dict()["rotate"] is True
    with pytest.raises(IsvitError, match="rotate must be True or False"):
        isvit.RepqConfig(rotate="yes")


@pytest.mark.parametrize("fields, rotated", [
    ({"method": "isvit", "preset": "fast", "w_bits": 3, "a_bits": 3}, True),
    ({"method": "isvit", "preset": "fast", "w_bits": 8, "a_bits": 4}, True),
    ({"method": "isvit", "preset": "thorough", "w_bits": 4, "a_bits": 4}, True),
    ({"method": "isvit", "preset": "fast", "w_bits": 6, "a_bits": 6}, False),
    ({"method": "isvit", "preset": "paper", "w_bits": 4, "a_bits": 4}, False),  # the paper's method
    ({"method": "repq", "w_bits": 4, "a_bits": 4}, False),  # the published peers
    ({"method": "isvit", "preset": "fast", "w_bits": 4, "a_bits": 4, "rotate": False}, False),
    ({"method": "minmax", "w_bits": 6, "a_bits": 6, "rotate": True}, True),
])
def test_the_fast_and_thorough_presets_rotate_at_low_bits(fields, rotated):
    config = method_config(**fields)
    assert config.wants_rotation() is rotated and config.to_dict()["rotate"] is rotated
    assert isvit.config_from_dict(config.to_dict()).wants_rotation() is rotated  # as a checkpoint rebuilds it


def test_the_preset_quantizes_without_a_rotation_the_model_cannot_carry():
    """The fast preset's default rotation is skipped, with one warning, where the model refuses it;
    asked for (rotate=True) the refusal stands; rotate=False goes without and without a word."""
    model = tiny_vit(global_pool="max")
    x = random_images(2, seed=0, size=32)
    config = isvit.IsvitConfig.from_preset(preset="fast", w_bits=4, a_bits=4, calib_size=2, iters=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = isvit.quantize(model, x, config, progress=False)
    told = [str(w.message) for w in caught if "rotation" in str(w.message)]
    assert told == [("rotation needs the class token, average or attention pooling before the head, not 'max': "
                     "quantizing it without the fast preset's rotation (--no-rotate, or rotate=False, does so "
                     "without this warning)")]
    assert not any(isinstance(m, RMSNorm) for m in qmodel.modules())
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all()
    with pytest.raises(IsvitError, match="average or attention pooling") as error:  # asked for: the sentence as it is
        isvit.quantize(model, x, dataclasses.replace(config, rotate=True), progress=False)
    assert "without" not in str(error.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        isvit.quantize(model, x, dataclasses.replace(config, rotate=False), progress=False)
    assert not [w for w in caught if "rotation" in str(w.message)]


def test_a_model_quantized_without_the_presets_rotation_reloads(tmp_path):
    """The file records what was done (not rotated), so the model is rebuilt without rotation."""
    model = tiny_vit(global_pool="max")
    config = isvit.IsvitConfig.from_preset(preset="fast", w_bits=4, a_bits=4, calib_size=2, iters=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = isvit.quantize(model, random_images(2, seed=0, size=32), config, progress=False)
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name="vit_tiny_patch16_224", config=config,
                   data_config={"input_size": [3, 32, 32]}, model_args={**TINY_VIT, "global_pool": "max"})
    rebuilt, info = load_quantized(path)
    assert info["config"].rotate is False
    x = random_images(2, seed=3, size=32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), qmodel(x))


@pytest.mark.skipif(not VIT_TINY_WEIGHTS.is_file(), reason="../shared is not present")
@pytest.mark.parametrize("flag, expected", [("--rotate", True), ("--no-rotate", False), (None, False)])
def test_cli_rotate_flag_reaches_the_config(monkeypatch, capsys, flag, expected):
    seen = []

    def stop(model, calib, config, **kwargs):
        seen.append(config)
        raise IsvitError("stopped by the test")

    monkeypatch.setattr(cli, "quantize", stop)
    argv = ["quantize", "--model", "vit_tiny_patch16_224", "--weights", str(VIT_TINY_WEIGHTS), "--calib", str(CALIB_DIR),
            "--data", str(VAL_DIR), "--method", "repq", "--w-bits", "4", "--a-bits", "4", "--calib-size", "1",
            "--no-fp", "--quiet", *([flag] if flag else [])]
    assert cli.main(argv) == 2 and "stopped by the test" in capsys.readouterr().err
    assert seen[0].rotate is expected


def _rotated(model: nn.Module) -> nn.Module:
    rotate_model(model)
    return model


def _with_norm(model: nn.Module, norm: nn.Module) -> nn.Module:
    model.norm = norm
    return model


def _quantized(model: nn.Module) -> nn.Module:
    return isvit.quantize(model, random_images(2, seed=0), isvit.MinmaxConfig(calib_size=2), inplace=True)


@pytest.mark.parametrize("build, message", [
    (lambda: _rotated(small_vit()), "already rotated"),
    (lambda: _quantized(small_vit()), "already quantized"),
    (lambda: tiny_vit(global_pool="max"), "average or attention pooling before the head, not 'max'"),
    (lambda: tiny_vit(global_pool="prr"), "AttentionPoolPrr.*does not commute with a rotation"),
    (lambda: _with_norm(tiny_vit(num_classes=0), RmsNorm(32)),
     "norm is a RmsNorm; rotation needs a LayerNorm \\(or none\\)"),
    (lambda: _with_norm(tiny_vit(norm_layer=RmsNorm), nn.LayerNorm(32)), "norm is a LayerNorm; rotation needs a RmsNorm"),
    (lambda: tiny_vit(mlp_layer=SwiGLU, scale_mlp_norm=True), "blocks.0.mlp.norm is a LayerNorm"),
], ids=["rotated", "quantized", "max-pool", "prr-pool", "tower-rms-final-norm", "mixed-norms", "swiglu-sub-norm"])
def test_what_rotation_cannot_carry_is_one_sentence(build, message):
    model = build()
    untouched = copy.deepcopy(model.state_dict())
    with pytest.raises(IsvitError, match=message) as error:
        rotate_model(model)
    assert "\n" not in str(error.value)
    state = model.state_dict()  # refused before any weight changed
    assert state.keys() == untouched.keys() and all(torch.equal(state[k], untouched[k]) for k in state)
