"""timm's ``Beit`` (BEiT, BEiT v2): pre-norm blocks with a relative position bias per block.

``qkv`` takes the separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one bias; a SwiGLU
MLP's ``fc1_g`` and ``fc1_x`` become one ``fc1`` (``modules.QuantSwiGLU``); an MLP's sub-LayerNorm
(``mlp.norm``) makes ``fc2`` a post-LayerNorm Linear, folded like ``qkv`` and ``fc1``. The relative
position biases and LayerScale stay floating point. A relative position bias shared by all blocks
(``use_shared_rel_pos_bias``) is refused.

No rotation: it is not written for BEiT's blocks, whose LayerScale (``gamma_1``, ``gamma_2``) and
q/v biases are parameters of their own rather than the modules the ViT rotation rewrites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.models.beit import Attention, Beit, Block
from torch import nn

from ..errors import IsvitError
from ..modules import QuantLinear, QuantMatMul
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


class BEiT(Family):
    name = "beit"
    description = "Beit"
    model_types = (Beit,)
    block_types = (Block,)
    no_rotation = "it is not written for BEiT's blocks, whose LayerScale and q/v biases are parameters of their own"

    def check(self, model: nn.Module) -> None:
        if model.rel_pos_bias is not None:
            raise IsvitError("the model shares one relative position bias among its blocks "
                             "(use_shared_rel_pos_bias), which isvit does not support; it takes a bias per block")
        for name, block in numbered_blocks(model):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise IsvitError(f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; "
                                 "isvit supports timm's BEiT Block with its Attention")
            check_layernorm(block.norm1, f"{name}.norm1")
            check_layernorm(block.norm2, f"{name}.norm2")
            check_mlp(name, block.mlp)

    def wrap(self, model: nn.Module, p: Placement) -> None:
        wrap_token_blocks(model, p, QuantBeitAttention)

    def units(self, model: nn.Module) -> list[Unit]:
        def embed_tokens(x):
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if model.pos_embed is not None:
                x = x + model.pos_embed
            return model.pos_drop(x)

        units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
        units += [Unit(name, block) for name, block in numbered_blocks(model)]
        units.append(Unit("head", Head(model), pre=model.norm))
        return units

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return token_block_pairs(model)


def _attention_output_bias(relative_position_bias, shared_bias):
    """The float biases added to ``q @ k^T`` before the Softmax (either may be None)."""
    if relative_position_bias is None:
        return shared_bias
    return relative_position_bias if shared_bias is None else relative_position_bias + shared_bias


class QuantBeitAttention(nn.Module):
    """BEiT's attention (timm ``beit.Attention``) with quantized products.

    ``qkv`` carries BEiT's separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one bias
    (``base.single_bias_qkv``);
    the relative position bias (the block's own table, and a model-wide one if given) is added in
    floating point before the Softmax.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_size = attn.window_size
        self.relative_position_bias_table = attn.relative_position_bias_table
        if attn.relative_position_index is not None:
            self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        else:
            self.relative_position_index = None
        self.qkv, self.proj = qkv, proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.qk, self.av = qk, av

    def relative_position_bias(self) -> torch.Tensor | None:
        if self.relative_position_bias_table is None:
            return None
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.qk(q * self.scale, k.transpose(-2, -1))
        bias = _attention_output_bias(self.relative_position_bias(), shared_rel_pos_bias)
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av(attn, v).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))
