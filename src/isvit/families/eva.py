"""timm's ``Eva``: EVA-02, DINOv3, the RoPE ViTs (axial, with an absolute position embedding, or
mixed) and the Perception Encoder: pre-norm blocks with a rotary position embedding.

``qkv`` takes the separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one bias (separate
``q_proj`` / ``k_proj`` / ``v_proj`` become one ``qkv``); a SwiGLU MLP's ``fc1_g`` and ``fc1_x``
become one ``fc1`` (``modules.QuantSwiGLU``); a sub-LayerNorm (``attn.norm``, ``mlp.norm``) makes
the Linear after it a post-LayerNorm one, folded like ``qkv`` and ``fc1``. Both of timm's attentions
are carried by ``QuantEvaAttention``: ``EvaAttention`` (EVA-02, DINOv3) and ``timm.layers``'
``AttentionRope`` (RoPE ViT, Perception Encoder; grouped-query attention with fewer k/v heads too).
The rotary embedding, the q/k norms and LayerScale stay floating point; prefix tokens (class,
DINOv3's storage/register tokens) are not rotated, as in timm.

- Dynamic image sizes (``dynamic_img_size``, DINOv3): the quantized model runs at any size in
  PyTorch, its rotary embedding (and resampled absolute position embedding) built for that size as
  timm does. The reconstruction units build it for the grid of the calibration images: the model's
  own grid, or a square one for another token count (``_grid``). The ONNX export is at one size.
- A rotary embedding per block (``rope_type`` mixed, learnt frequencies): each block's unit gets
  its own, ``rope[i]``, as ``Eva.forward_features`` hands it.
- An attention-pool head (``global_pool='map'``, Perception Encoder core): left floating point, as
  the ViT adapter leaves SigLIP's: it reads the final norm's tokens once per image, and the head
  after it is quantized.

Refused: post-norm blocks (``EvaBlockPostNorm``), gated attention, norms other than LayerNorm
before the Linears (the post-LayerNorm fold writes into a LayerNorm's affine).

No rotation: it is not written for EVA's blocks yet. Rotating the residual stream by one Q would be
exact (only the Linears' input and output sides change); rotating each head's q and k, as the ViT
adapter does, is not, because the rotary embedding turns pairs of q and k channels by
position-dependent angles and a head rotation commutes with those 2x2 rotations only if it is made
of such 2x2 rotations of the same pairs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import timm.layers
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

# The attentions QuantEvaAttention carries: timm.layers' AttentionRope (RoPE ViT, Perception Encoder)
# came in a later timm 1.0 release than EvaAttention.
ATTENTIONS = tuple(a for a in (EvaAttention, getattr(timm.layers, "AttentionRope", None)) if a is not None)


def _grid(model: nn.Module, tokens: int) -> tuple[int, int]:
    """The patch grid of a sequence of ``tokens`` tokens (prefix tokens included): the model's own,
    or, for a model of dynamic image sizes given another token count, the square grid of that many
    patches (a reconstruction unit sees tokens, not the image they came from)."""
    grid = tuple(model.patch_embed.grid_size)
    patches = tokens - model.num_prefix_tokens
    if patches == grid[0] * grid[1] or not getattr(model, "dynamic_img_size", False):
        return grid
    side = math.isqrt(patches)
    if side * side != patches:
        raise IsvitError(f"the unit cannot tell the patch grid of {patches} patches: calibrate this model "
                         f"with square images or at its own size {model.patch_embed.img_size}")
    return side, side


def _rope(model: nn.Module, tokens: int, index: int) -> torch.Tensor | None:
    """The rotary embedding ``Eva._pos_embed`` and ``Eva.forward_features`` hand block ``index``
    (eval mode) for a sequence of ``tokens`` tokens: built for the grid where the image size is
    dynamic, the cached one otherwise; block ``index``'s own where there is one per block (mixed)."""
    if model.rope is None:
        return None
    if getattr(model, "dynamic_img_size", False) or not hasattr(model.rope, "feat_shape"):
        rope = model.rope.get_embed(shape=_grid(model, tokens))
    else:
        rope = model.rope.get_embed()
    return rope[index] if getattr(model, "rope_mixed", False) else rope


class EvaRopeBlock(nn.Module):
    """An EVA block as a unit's body: ``block(x, rope=...)`` with the rotary embedding the model
    hands block ``index``."""

    def __init__(self, block: nn.Module, model: nn.Module, index: int):
        super().__init__()
        self.block = block
        self._rope = lambda tokens: _rope(model, tokens, index)  # not a submodule: the model holds the unit

    def forward(self, x):
        return self.block(x, rope=self._rope(x.shape[1]))


class EVA(Family):
    name = "eva"
    description = "Eva"
    model_types = (Eva,)
    block_types = (EvaBlock, EvaRopeBlock)
    no_rotation = ("it is not written for EVA's blocks yet (the residual stream could be rotated exactly, but not "
                   "each head's q and k: the rotary embedding turns pairs of their channels by angles that depend "
                   "on the position, which a rotation of the head's channels does not commute with)")

    def check(self, model: nn.Module) -> None:
        for name, block in numbered_blocks(model):
            if type(block) is not EvaBlock or type(block.attn) not in ATTENTIONS:
                raise IsvitError(f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; "
                                 "isvit supports timm's pre-norm EvaBlock with EvaAttention or AttentionRope")
            if getattr(block.attn, "gate", None) is not None:
                raise IsvitError(f"{name}.attn is gated (gated_attn), which isvit does not support")
            check_layernorm(block.norm1, f"{name}.norm1")
            check_layernorm(block.norm2, f"{name}.norm2")
            attn_norm = getattr(block.attn, "norm", nn.Identity())
            if not isinstance(attn_norm, (nn.LayerNorm, nn.Identity)):
                raise IsvitError(f"{name}.attn.norm is a {type(attn_norm).__name__}; isvit needs LayerNorm (or none) there")
            check_mlp(name, block.mlp)

    def wrap(self, model: nn.Module, p: Placement) -> None:
        # the attention pool (global_pool='map') stays float: module docstring
        wrap_token_blocks(model, p, QuantEvaAttention)

    def units(self, model: nn.Module) -> list[Unit]:
        def embed_tokens(x):
            return model.norm_pre(model._pos_embed(x)[0])

        units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
        units += [Unit(name, EvaRopeBlock(block, model, i)) for i, (name, block) in enumerate(numbered_blocks(model))]
        units.append(Unit("head", Head(model), pre=model.norm))
        return units

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return token_block_pairs(model)


class QuantEvaAttention(nn.Module):
    """EVA's attention (timm ``EvaAttention``, and ``AttentionRope`` which computes the same) with
    quantized products.

    ``qkv`` is one Linear: the fused one (with ``EvaAttention``'s separate ``q_bias`` / zero ``k_bias``
    / ``v_bias`` as its one bias), or ``q_proj``, ``k_proj`` and ``v_proj`` joined
    (``base.single_bias_qkv``). With grouped-query attention (``AttentionRope``'s ``num_kv_heads``)
    k and v have fewer heads, each repeated for its group of q heads after the rotary embedding.
    The rotary position embedding is applied to q and k in floating point before they are quantized
    for ``q @ k^T``; the optional q/k norms and the sub-LayerNorm before ``proj`` (``norm``) stay float.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        # getattr: the attributes that not every timm 1.0.x release's EvaAttention has
        self.num_heads = attn.num_heads
        self.head_dim = proj.in_features // attn.num_heads
        self.num_kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
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
        if self.num_kv_heads == self.num_heads:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # grouped-query attention: q's heads, then k's and v's fewer ones
            kv_dim = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv(x).split((self.num_heads * self.head_dim, kv_dim, kv_dim), dim=-1)
            q = q.reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = k.reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
            v = v.reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        if self.num_kv_heads != self.num_heads:  # head h reads k/v head h // group, as timm's repeat_interleave
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn = self.qk(q * self.scale, k.transpose(-2, -1))
        bias = additive_mask(attn_mask, is_causal, N, attn)
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av(attn, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(self.norm(x)))
