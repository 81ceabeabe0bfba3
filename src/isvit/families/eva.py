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
