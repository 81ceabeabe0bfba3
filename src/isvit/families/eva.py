"""timm's ``Eva`` (EVA-02): pre-norm blocks with a rotary position embedding.

``qkv`` takes the separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one bias (separate
``q_proj`` / ``k_proj`` / ``v_proj`` become one ``qkv``); a SwiGLU MLP's ``fc1_g`` and ``fc1_x``
become one ``fc1`` (``modules.QuantSwiGLU``); a sub-LayerNorm (``attn.norm``, ``mlp.norm``) makes
the Linear after it a post-LayerNorm one, folded like ``qkv`` and ``fc1``. The rotary embedding,
the q/k norms and LayerScale stay floating point. Refused: dynamic image sizes, a rotary embedding
per block (``rope_type`` mixed), an attention-pool head, gated attention.

No rotation: it is not written for EVA's blocks (q/k/v biases of their own, SwiGLU, sub-LayerNorms),
and their rotary embedding, which turns pairs of q and k channels, would rule out rotating each
head's q and k.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from ..errors import IsvitError
from ..modules import QuantLinear, QuantMatMul, additive_mask
from .base import (
    Family,
    Head,
    Unit,
    check_layernorm,
    check_mlp,
    numbered_blocks,
    token_block_pairs,
    wrap_token_blocks,
)

if TYPE_CHECKING:
    from ..hf import Renaming
    from ..wrap import Placement


def _rope(model: nn.Module) -> torch.Tensor | None:
    """The rotary embedding ``Eva._pos_embed`` hands every block (fixed image size, eval mode)."""
    if model.rope is None:
        return None
    if hasattr(model.rope, "feat_shape"):
        return model.rope.get_embed()
    return model.rope.get_embed(shape=model.patch_embed.grid_size)


class EvaRopeBlock(nn.Module):
    """An EVA block as a unit's body: ``block(x, rope=...)`` with the model's rotary embedding."""

    def __init__(self, block: nn.Module, model: nn.Module):
        super().__init__()
        self.block = block
        self._rope = lambda: _rope(model)  # not a submodule: the model holds the unit

    def forward(self, x):
        return self.block(x, rope=self._rope())


class EVA(Family):
    name = "eva"
    description = "Eva"
    model_types = (Eva,)
    block_types = (EvaBlock, EvaRopeBlock)
    no_rotation = ("it is not written for EVA's blocks, and their rotary embedding would rule out rotating "
                   "each head's q and k")
    # Hugging Face transformers: DINOv3ViTModel (renamer at the end of this file). It has no task
    # model; "model." is where transformers 5.x keeps its blocks in memory (saved as "layer.").
    transformers_prefixes = ("model.",)
    transformers_names = ("DINOv3",)

    def from_transformers(self, keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor] | None:
        return _dinov3(keys, model, path) if keys.has("layer.0.layer_scale1.lambda1") else None

    def check(self, model: nn.Module) -> None:
        if getattr(model, "dynamic_img_size", False):
            raise IsvitError("the model takes dynamic image sizes (dynamic_img_size), which isvit does not support for EVA")
        if getattr(model, "rope_mixed", False):
            raise IsvitError("the model has a rotary embedding per block (rope_type mixed), which isvit does not support")
        if getattr(model, "attn_pool", None) is not None:
            raise IsvitError("the model pools with an attention pool (global_pool='map'), which isvit does not quantize for EVA")
        for name, block in numbered_blocks(model):
            if type(block) is not EvaBlock or type(block.attn) is not EvaAttention:
                raise IsvitError(f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; "
                                 "isvit supports timm's pre-norm EvaBlock with EvaAttention")
            if getattr(block.attn, "gate", None) is not None:
                raise IsvitError(f"{name}.attn is gated (gated_attn), which isvit does not support")
            check_layernorm(block.norm1, f"{name}.norm1")
            check_layernorm(block.norm2, f"{name}.norm2")
            attn_norm = getattr(block.attn, "norm", nn.Identity())
            if not isinstance(attn_norm, (nn.LayerNorm, nn.Identity)):
                raise IsvitError(f"{name}.attn.norm is a {type(attn_norm).__name__}; isvit needs LayerNorm (or none) there")
            check_mlp(name, block.mlp)

    def wrap(self, model: nn.Module, p: Placement) -> None:
        wrap_token_blocks(model, p, QuantEvaAttention)

    def units(self, model: nn.Module) -> list[Unit]:
        def embed_tokens(x):
            return model.norm_pre(model._pos_embed(x)[0])

        units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
        units += [Unit(name, EvaRopeBlock(block, model)) for name, block in numbered_blocks(model)]
        units.append(Unit("head", Head(model), pre=model.norm))
        return units

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return token_block_pairs(model)


class QuantEvaAttention(nn.Module):
    """EVA's attention (timm ``EvaAttention``) with quantized products.

    ``qkv`` is one Linear: the fused one with the separate ``q_bias`` / zero ``k_bias`` / ``v_bias``
    as its one bias, or ``q_proj``, ``k_proj`` and ``v_proj`` joined
    (``base.single_bias_qkv``).
    The rotary position embedding is applied to q and k in floating point before they are quantized
    for ``q @ k^T``; the optional q/k norms and the sub-LayerNorm before ``proj`` (``norm``) stay float.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        # getattr: the attributes that not every timm 1.0.x release's EvaAttention has
        self.num_heads = attn.num_heads
        self.head_dim = proj.in_features // attn.num_heads
        self.scale = attn.scale
        self.num_prefix_tokens = getattr(attn, "num_prefix_tokens", 1)
        self.rotate_half = getattr(attn, "rotate_half", False)
        self.qkv, self.proj = qkv, proj
        self.q_norm = getattr(attn, "q_norm", nn.Identity())
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.norm = getattr(attn, "norm", nn.Identity())
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.qk, self.av = qk, av

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        from timm.layers import apply_rot_embed_cat

        npt = self.num_prefix_tokens
        return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=self.rotate_half)], dim=2)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        attn = self.qk(q * self.scale, k.transpose(-2, -1))
        bias = additive_mask(attn_mask, is_causal, N, attn)
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av(attn, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(self.norm(x)))


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers checkpoints
# ---------------------------------------------------------------------------------------------

def _dinov3(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """DINOv3ViTModel (or DINOv3ViTBackbone, the same tensors) -> timm's DINOv3 Evas
    (vit_small_patch16_dinov3 ...): class token, register tokens, patches; a rotary embedding on the
    patches, computed from the image size alone (nothing saved: transformers' ``inv_freq`` is a
    buffer it does not save, timm's is recomputed too); LayerScale in every block; a final norm.

    q, k and v become timm's ``qkv``; q's and v's biases its ``q_bias`` and ``v_bias`` (timm's k
    bias is fixed at zero, as DINOv3's key_bias=False has it). A timm model without q/v biases
    (the DINOv3s without ``_qkvb``) takes a checkpoint whose biases are all zero, as Meta's distilled
    ones are. Gated MLPs (``use_gated_mlp``: act(gate) * up) become timm's SwiGLU (``fc1_g``,
    ``fc1_x``) or its packed GluMlp (``fc1`` = gate rows then up rows)."""
    blocks = keys.prefix + "layer."  # the saved "layer.{i}.", or 5.x's in-memory "model.layer.{i}."
    expected = model.state_dict()
    keys.move("embeddings.cls_token", "cls_token")
    registers = keys.take("embeddings.register_tokens")
    if registers is not None and registers.shape[1] > 0:
        keys.out["reg_token"] = registers
    keys.move_layer("embeddings.patch_embeddings", "patch_embed.proj")
    keys.drop("embeddings.mask_token")  # masked image modelling's token: never used by the features
    keys.drop("rope_embeddings.inv_freq")
    for i in keys.numbers(rf"{re.escape(blocks)}(\d+)\."):
        src, dst = f"{blocks}{i}.", f"blocks.{i}."
        keys.move_layer(src + "norm1", dst + "norm1")
        _dinov3_attention(keys, src + "attention.", dst + "attn.", expected, path)
        keys.move_layer(src + "attention.o_proj", dst + "attn.proj")
        keys.move(src + "layer_scale1.lambda1", dst + "gamma_1")
        keys.move_layer(src + "norm2", dst + "norm2")
        _dinov3_mlp(keys, src + "mlp.", dst + "mlp.", expected)
        keys.move(src + "layer_scale2.lambda1", dst + "gamma_2")
    keys.move_layer("norm", "norm")
    return keys.result()


def _dinov3_mlp(keys: Renaming, src: str, dst: str, expected: dict) -> None:
    """up_proj, down_proj -> ``fc1``, ``fc2``; a gated MLP's gate_proj -> SwiGLU's ``fc1_g`` (up_proj
    its ``fc1_x``), or both into a packed GluMlp's ``fc1``, gate rows first (timm's gate_last=False)."""
    gate, up = src + "gate_proj", src + "up_proj"
    if f"{gate}.weight" in keys.left and f"{dst}fc1_g.weight" in expected:
        keys.move_layer(gate, dst + "fc1_g")
        keys.move_layer(up, dst + "fc1_x")
    elif f"{gate}.weight" in keys.left:
        for part in ("weight", "bias"):
            if f"{gate}.{part}" in keys.left and f"{up}.{part}" in keys.left:
                keys.out[f"{dst}fc1.{part}"] = torch.cat([keys.take(f"{gate}.{part}"), keys.take(f"{up}.{part}")])
    else:
        keys.move_layer(up, dst + "fc1")
    keys.move_layer(src + "down_proj", dst + "fc2")


def _dinov3_attention(keys: Renaming, src: str, dst: str, expected: dict, path) -> None:
    """q_proj, k_proj, v_proj -> ``qkv`` with ``q_bias`` / ``v_bias`` (or timm's separate
    ``q_proj`` / ``k_proj`` / ``v_proj`` where the model has them, qkv_fused=False)."""
    if f"{dst}qkv.weight" not in expected:
        for name in ("q_proj", "k_proj", "v_proj"):
            keys.move_layer(src + name, dst + name)
        return
    weights = [f"{src}{name}.weight" for name in ("q_proj", "k_proj", "v_proj")]
    if all(w in keys.left for w in weights):
        keys.out[f"{dst}qkv.weight"] = torch.cat([keys.take(w) for w in weights])
    k_bias = keys.take(f"{src}k_proj.bias")
    if k_bias is not None and bool(k_bias.any()):
        raise IsvitError(f"weights file {path} holds a DINOv3 whose key projection has a bias (key_bias), "
                         "which timm's DINOv3 fixes at zero")
    q_bias, v_bias = keys.take(f"{src}q_proj.bias"), keys.take(f"{src}v_proj.bias")
    if f"{dst}q_bias" in expected:
        like = keys.out.get(f"{dst}qkv.weight", expected[f"{dst}q_bias"]).new_zeros(expected[f"{dst}q_bias"].shape)
        keys.out[f"{dst}q_bias"] = q_bias if q_bias is not None else like
        keys.out[f"{dst}v_bias"] = v_bias if v_bias is not None else like
    elif any(b is not None and bool(b.any()) for b in (q_bias, v_bias)):
        raise IsvitError(f"weights file {path} holds a DINOv3 with q and v biases, which the timm model has no "
                         "place for: name its _qkvb variant (such as vit_small_patch16_dinov3_qkvb)")
