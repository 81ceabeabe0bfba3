"""One small random model per variant of every registered family, for the adapter contract
(test_contract.py) and the family-specific tests (test_families.py, test_family_*.py). A family
added to ``isvit.families.FAMILIES`` without an entry here fails that test: every adapter must show
it keeps the contract.

Each model has its parameters redrawn so that every part counts (timm's initialisation leaves
heads, LayerScale, relative position biases, position embeddings, prefix tokens and post-norms near
zero or one, which would hide errors in the surgery); the arguments are lists, not tuples, so they
survive a checkpoint's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import timm
import torch

import isvit
from isvit.errors import IsvitError
from isvit.modules import QuantLinear, QuantMatMul
from isvit.wrap import Placement, wrap_model

from conftest import random_images

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
# the same 4 x 4 token grid from 64 x 64 images in 16 x 16 patches (the RoPE ViTs, AIMv2, NaFlexVit)
SMALL64 = {**SMALL, "img_size": 64, "patch_size": 16}
# NaFlexVit's learned position embedding on the 4 x 4 grid of a 64 x 64 image (as the full-size
# models' 16 x 16 at 256 x 256): NCHW images of that size use it as it is
NAFLEX = {**SMALL64, "pos_embed_grid_size": [4, 4]}
SWIN = {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 32, "depths": [2, 2], "num_heads": [2, 2],
        "num_classes": 10}
HIERA = {"img_size": [64, 64], "embed_dim": 16, "num_heads": 1, "stages": [1, 2, 2, 1], "num_classes": 10}
# 16 x 16 tokens in windows of 4, then 8 x 8 padded to windows of 6, 4 x 4 global, 2 x 2
HIERADET = {"embed_dim": 16, "num_heads": 1, "stages": [1, 2, 2, 1], "window_spec": [4, 6, 2, 1],
            "global_att_blocks": [4], "num_classes": 10}
CLASSES = 10


@dataclass(frozen=True)
class Example:
    timm_name: str
    args: dict = field(default_factory=dict)
    img_size: int = 32

    @property
    def classifier(self) -> bool:
        """A classifier (logits over CLASSES), not a feature tower (``num_classes=0``)."""
        return self.args.get("num_classes", 1) != 0

    def model(self, seed: int = 0, **overrides) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = timm.create_model(self.timm_name, pretrained=False, **{**self.args, **overrides}).eval()
        redraw(model)
        return model

    def images(self, n: int, seed: int, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        return random_images(n, self.img_size if size is None else size, seed=seed)


def refused_before_any_change(model: torch.nn.Module, images: torch.Tensor, message: str) -> None:
    """What an adapter cannot carry: ``quantize`` and ``wrap_model`` refuse ``model`` in one
    sentence matching ``message``, before any module is swapped."""
    with pytest.raises(IsvitError, match=message) as refusal:
        isvit.quantize(model, images, isvit.MinmaxConfig(w_bits=8, a_bits=8), progress=False)
    assert "\n" not in str(refusal.value)
    with pytest.raises(IsvitError, match=message):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (QuantLinear, QuantMatMul)) for m in model.modules())


@torch.no_grad()
def redraw(model: torch.nn.Module) -> None:
    """Parameters drawn so that every part of the model moves its output: LayerScale at 1; biases
    (the norms' too: the rotation folds them into the Linears), q/v biases and relative position
    bias tables at N(0, 0.5); position embeddings (absolute and windowed), prefix tokens and an
    attention pool's latent query at N(0, 0.5); norm weights around 1; every 2-d weight of unit
    gain; the classifier (whatever its name: ``head``, ``head.fc``) larger, to spread the logits."""
    for key, p in model.named_parameters():
        leaf = key.rsplit(".", 1)[-1]
        if leaf.startswith("gamma"):
            p.fill_(1.0)
        elif (leaf in ("q_bias", "v_bias", "relative_position_bias_table", "cls_token", "reg_token", "latent")
              or leaf.startswith("pos_embed") or (p.dim() == 1 and leaf == "bias")):
            p.normal_(0.0, 0.5)
        elif p.dim() == 1 and "norm" in key and leaf == "weight":
            p.normal_(1.0, 0.2)
        elif p.dim() == 2 and leaf == "weight":
            p.normal_(0.0, p.shape[1] ** -0.5)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == CLASSES:  # the classifier
            module.weight.normal_(0.0, 0.5)


# family name -> its variants (a registered family needs one at least)
EXAMPLES: dict[str, dict[str, Example]] = {
    "vit": {
        "vit": Example("vit_tiny_patch16_224", SMALL),
        "deit-distilled": Example("deit_tiny_distilled_patch16_224", SMALL),
        "feature-tower": Example("vit_tiny_patch16_224", {**SMALL, "num_classes": 0}),
        "aimv2": Example("aimv2_large_patch14_224", SMALL64, img_size=64),  # SwiGLU, RmsNorm
        "aimv2-tower": Example("aimv2_large_patch14_224", {**SMALL64, "num_classes": 0}, img_size=64),  # as published
    },
    "swin": {
        "swin": Example("swin_tiny_patch4_window7_224", SWIN),
    },
    "swinv2": {
        # 8 x 8 tokens in windows of 4 (shifted in the first stage), then 4 x 4 in one window
        "swinv2": Example("swinv2_tiny_window8_256", SWIN),
    },
    "beit": {
        "beit": Example("beit_base_patch16_224", SMALL),
        "beit-swiglu": Example("beit_base_patch16_224", {**SMALL, "swiglu_mlp": True, "scale_mlp": True}),
    },
    "eva": {
        # EVA-02 tiny: packed GluMlp, fused qkv
        "eva02": Example("eva02_tiny_patch14_224", {**SMALL, "ref_feat_shape": [4, 4]}),
        # EVA-02 base's layout: SwiGLU with fc1_g / fc1_x and a sub-LayerNorm, separate q/k/v
        # projections, and a sub-LayerNorm before attn.proj as well
        "eva02-base": Example("eva02_base_patch14_224", {**SMALL, "ref_feat_shape": [4, 4], "scale_attn_inner": True}),
        # DINOv3: EvaAttention without qkv bias, rotary embedding with 4 storage tokens unrotated,
        # LayerScale, dynamic image sizes, average pooling; and with q/v biases
        "dinov3": Example("vit_small_patch16_dinov3", SMALL64, img_size=64),
        "dinov3-qkvb": Example("vit_small_patch16_dinov3_qkvb", SMALL64, img_size=64),
        # RoPE ViTs (AttentionRope): a learnt rotary embedding per block; axial; axial with an
        # absolute position embedding too; separate q/k/v projections, grouped-query attention (one
        # k/v head), q/k norms and both sub-LayerNorms
        "rope-mixed": Example("vit_small_patch16_rope_mixed_224", SMALL64, img_size=64),
        "rope-axial": Example("vit_small_patch16_rope_224", SMALL64, img_size=64),
        "rope-ape": Example("vit_small_patch16_rope_ape_224", SMALL64, img_size=64),
        "rope-gqa": Example("vit_small_patch16_rope_224", {**SMALL64, "qkv_fused": False, "num_kv_heads": 1,
                                                           "qk_norm": True, "scale_attn_inner": True,
                                                           "scale_mlp": True}, img_size=64),
        # the Perception Encoder: core (norm_pre, an attention pool left float), spatial (no final norm)
        "pe-core": Example("vit_pe_core_small_patch16_384", SMALL64, img_size=64),
        "pe-spatial": Example("vit_pe_spatial_small_patch16_512", SMALL64, img_size=64),
    },
    "naflexvit": {
        "naflex-siglip": Example("naflexvit_base_patch16_siglip", NAFLEX, img_size=64),  # attention pool ('map')
        "naflex-gap": Example("naflexvit_base_patch16_gap", NAFLEX, img_size=64),  # registers, LayerScale, fc_norm
        "naflex-map": Example("naflexvit_base_patch16_map", NAFLEX, img_size=64),
        "naflex-token": Example("naflexvit_base_patch16_gap", {**NAFLEX, "class_token": True, "global_pool": "token",
                                                               "fc_norm": False}, img_size=64),
        "naflex-conv": Example("naflexvit_base_patch16_siglip", {**NAFLEX, "embed_proj_type": "conv"}, img_size=64),
    },
    "hiera": {
        "hiera": Example("hiera_tiny_224", HIERA, img_size=64),
        # LayerScale, the abs-win position embedding, no proj at the stage transitions
        "hiera-abswin": Example("hiera_small_abswin_256", {**HIERA, "global_pos_size": [8, 8]}, img_size=64),
    },
    "hieradet": {
        "sam2-hiera": Example("sam2_hiera_tiny", HIERADET, img_size=64),
        "sam2-features": Example("sam2_hiera_tiny", {**HIERADET, "num_classes": 0}, img_size=64),  # SAM 2's encoder
    },
}


# variant name -> its example (the names are unique across families)
VARIANTS: dict[str, Example] = {variant: ex for variants in EXAMPLES.values() for variant, ex in variants.items()}
assert len(VARIANTS) == sum(len(v) for v in EXAMPLES.values()), "a variant's name is taken twice"


def small_model(variant: str, **overrides) -> torch.nn.Module:
    """The example ``variant``'s model (its parameters redrawn), with ``overrides`` of its arguments."""
    return VARIANTS[variant].model(**overrides)


def runs_with(variant: str):
    """Skipped where the installed timm lacks the variant's model (timm 1.0.3 has neither abs-win
    Hiera nor HieraDet; NaFlexVit came with timm 1.0.16)."""
    name = VARIANTS[variant].timm_name
    return pytest.mark.skipif(not timm.is_model(name), reason=f"no {name} in this timm")


def params(*variants: str) -> list:
    """``variants`` as pytest parameters, each skipped where timm lacks its model."""
    return [pytest.param(v, marks=runs_with(v)) for v in variants]


def cases(as_one: bool = False) -> list:
    """(family, variant) of every example, skipped where the installed timm lacks its model; as
    one value, a tuple, for a fixture's params."""
    return [pytest.param(*([(family, variant)] if as_one else [family, variant]), id=f"{family}-{variant}",
                         marks=runs_with(variant))
            for family, variants in EXAMPLES.items() for variant in variants]
