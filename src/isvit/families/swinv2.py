"""timm's ``SwinTransformerV2``: post-norm blocks with cosine window attention.

Its blocks are post-norm (the LayerNorm comes after the Linear, whose input is the residual
stream): its ``qkv``, ``fc1`` and ``reduction`` inputs are per tensor and it has no pair for the
fold. ``qkv`` takes the separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one bias; the
logit scale and the continuous position bias MLP (``cpb_mlp``) stay floating point.

No rotation: the post-norm blocks write the residual stream through a LayerNorm, whose
per-channel affine does not commute with a rotation of the stream.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer_v2 import PatchMerging, SwinTransformerV2, SwinTransformerV2Block, WindowAttention
from torch import nn

from ..errors import IsvitError
from ..modules import QuantConv2d, QuantLinear, QuantMatMul, window_attention_output
from .base import Family, Head, Unit, single_bias_qkv, staged_blocks, staged_units

if TYPE_CHECKING:
    from ..wrap import Placement


class SwinV2(Family):
    name = "swinv2"
    description = "SwinTransformerV2"
    model_types = (SwinTransformerV2,)
    block_types = (SwinTransformerV2Block,)
    no_rotation = ("its post-norm blocks write the stream through a LayerNorm, whose per-channel affine "
                   "does not commute with a rotation")

    def check(self, model: nn.Module) -> None:
        for i, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
                raise IsvitError(f"layers.{i}.downsample is a {type(stage.downsample).__name__}; "
                                 "isvit supports Swin V2's PatchMerging there")
        for name, block in staged_blocks(model):
            if (type(block) is not SwinTransformerV2Block or type(block.attn) is not WindowAttention
                    or type(block.mlp) is not Mlp):
                raise IsvitError(f"{name} is a {type(block).__name__} with {type(block.attn).__name__} and "
                                 f"{type(block.mlp).__name__}; isvit supports timm's SwinTransformerV2Block with "
                                 "WindowAttention and Mlp")

    def wrap(self, model: nn.Module, p: Placement) -> None:
        model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
        for stage in model.layers:
            if isinstance(stage.downsample, PatchMerging):
                stage.downsample.reduction = p.linear(stage.downsample.reduction, "tensor")
        for _, block in staged_blocks(model):
            qk, av = p.matmuls()
            attn = block.attn
            block.attn = QuantCosineWindowAttention(
                attn, p.linear(single_bias_qkv(attn), "tensor"), p.linear(attn.proj, "tensor"), qk, av
            )
            block.mlp.fc1 = p.linear(block.mlp.fc1, "tensor")
            block.mlp.fc2 = p.linear(block.mlp.fc2, "tensor")
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            model.head.fc = p.linear(model.head.fc, "tensor")

    def units(self, model: nn.Module) -> list[Unit]:
        return staged_units(model, Head(model))

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return []  # its LayerNorms come after the Linears, never before one


class QuantCosineWindowAttention(nn.Module):
    """Swin V2's window attention (timm ``swin_transformer_v2.WindowAttention``) with quantized
    products: cosine attention, whose ``q @ k^T`` takes the L2-normalised q and k as its operands.

    ``qkv`` carries the separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one bias
    (``base.single_bias_qkv``);
    the learnt logit scale, the continuous position bias (``cpb_mlp`` on the relative coordinates)
    and the shifted-window mask stay floating point.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        self.num_heads = attn.num_heads
        self.window_size = attn.window_size
        self.logit_scale = attn.logit_scale
        self.cpb_mlp = attn.cpb_mlp
        for name in ("relative_coords_table", "relative_position_index"):
            self.register_buffer(name, getattr(attn, name), persistent=name not in attn._non_persistent_buffers_set)
        self.qkv, self.proj = qkv, proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.qk, self.av = qk, av

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.qk(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn + self.relative_position_bias()
        return window_attention_output(self, attn, v, mask)
