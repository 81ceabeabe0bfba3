"""timm's ``HieraDet``: SAM 2's Hiera image encoder, with ``MultiScaleBlock`` and ``MultiScaleAttention``.

Its tokens stay on their (B, H, W, C) grid: a block attends within windows (``window_partition``,
after zero padding of the grid to a multiple of the window) or globally, and where a stage begins it
max-pools q (``MaxPool2d``) and its dim-changing ``proj``'s output, the next stage's stream. It takes
any image size (no ``img_size``); SAM 2 uses it as a feature extractor (``num_classes=0``; the
multi-scale features of ``forward_intermediates`` come from the same quantized blocks).

Surgery: the patch embedding's Conv2d; each block's attention (as ``QuantMultiScaleAttention``: q @ k^T
and attn @ v quantized, the q pooling in float), MLP and, where a stage begins, ``proj``; the head's
``fc``. The position embedding (the global one interpolated, the window one tiled) stays floating point.

Fold pairs: each block's norm2 -> fc1, and norm1 -> qkv only in a global block that keeps its width.
A windowed block pads norm1's output with zeros wherever the grid is not a multiple of its window
(SAM 2's own 1024-pixel input does, in its third stage: a 64 x 64 grid in windows of 14; the grid is
known only when the model runs), and zeros do not follow the fold's shift; a block that begins a
stage feeds norm1's output to ``proj`` as well. There qkv (and ``proj``) read per tensor, unfolded.

Units: the patch embedding (with the position embedding), every block, the head.

No rotation: where a stage begins the residual stream (``proj``'s output) and q are max-pooled channel
by channel, and a per-channel maximum does not commute with a rotation of the channels.

Refused: blocks of another kind, a q pooling other than MaxPool2d, norms other than LayerNorm, a head
other than timm's pool -> norm -> fc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import IsvitError
from ..modules import QuantLinear, QuantMatMul
from .base import Family, Head, Unit, numbered_blocks
from .hiera import block_pairs, block_proj, check_blocks, check_head, wrap_blocks

try:  # timm 1.0.9 and later
    from timm.models.hieradet_sam2 import HieraDet as TimmHieraDet
    from timm.models.hieradet_sam2 import MultiScaleAttention, MultiScaleBlock
except ImportError:  # pragma: no cover - an older timm has no HieraDet: the family matches no model
    TimmHieraDet = MultiScaleAttention = MultiScaleBlock = None

if TYPE_CHECKING:
    from ..wrap import Placement


class HieraDet(Family):
    name = "hieradet"
    description = "HieraDet (SAM 2 Hiera)"
    model_types = tuple(t for t in (TimmHieraDet,) if t is not None)
    block_types = tuple(t for t in (MultiScaleBlock,) if t is not None)
    no_rotation = ("where a stage begins it max-pools the residual stream and q channel by channel (MaxPool2d), "
                   "and a per-channel maximum does not commute with a rotation of the channels")

    def check(self, model: nn.Module) -> None:
        if not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise IsvitError(f"patch_embed.proj is a {type(model.patch_embed.proj).__name__}; "
                             "isvit needs a Conv2d there")
        check_blocks(model, MultiScaleBlock, MultiScaleAttention, _check_q_pool)
        check_head(model)

    def wrap(self, model: nn.Module, p: Placement) -> None:
        wrap_blocks(model, p, QuantMultiScaleAttention, folds_norm1)

    def units(self, model: nn.Module) -> list[Unit]:
        units = [Unit("patch_embed", model.patch_embed, post=model._pos_embed)]
        units += [Unit(name, block) for name, block in numbered_blocks(model)]
        units.append(Unit("head", Head(model)))
        return units

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return block_pairs(model, folds_norm1)


def _check_q_pool(name: str, attn: nn.Module) -> None:
    if attn.q_pool is not None and type(attn.q_pool) is not nn.MaxPool2d:
        raise IsvitError(f"{name}.attn pools q with a {type(attn.q_pool).__name__}; isvit supports MaxPool2d there")


def folds_norm1(block: nn.Module) -> bool:
    """norm1 -> qkv is a fold pair: a global block (no windows, so no zero padding) without ``proj``."""
    return not block.is_windowed and block_proj(block) is None


class QuantMultiScaleAttention(nn.Module):
    """SAM 2's Hiera attention (timm ``MultiScaleAttention``) with quantized products.

    Reads (B, H, W, C) tokens (a window each, or the whole grid); where the block begins a stage,
    q is max-pooled over the grid (``q_pool``, float) before ``q @ k^T``, and the output has the
    pooled grid.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.q_pool = attn.q_pool
        self.qkv, self.proj = qkv, proj
        self.qk, self.av = qk, av

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).unbind(2)  # each (B, H * W, heads, head_dim)
        if self.q_pool is not None:
            q = self.q_pool(q.reshape(B, H, W, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            H, W = q.shape[1:3]
            q = q.reshape(B, H * W, self.num_heads, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = self.qk(q * self.scale, k.transpose(-1, -2)).softmax(dim=-1)
        x = self.av(attn, v).transpose(1, 2).reshape(B, H, W, -1)
        return self.proj(x)
