"""timm's ``Hiera``: a hierarchical ViT whose tokens are unrolled into mask units, with
``HieraBlock`` and ``MaskUnitAttention``.

Surgery: the patch embedding's Conv2d; each block's attention (as ``QuantMaskUnitAttention``: q @ k^T
and attn @ v quantized, within each mask unit or over every token, q max-pooled over the unit's
``q_stride`` tokens as timm does), its MLP (``fc1``, ``fc2``) and, where a stage begins, the block's
dim-changing ``proj``; the head's ``fc``. The position embedding (absolute, or abs-win's window
embedding tiled over the interpolated global one), the unroll and the max pooling stay floating point.

Fold pairs (a LayerNorm whose output is read by one Linear only): each block's norm2 -> fc1, and
norm1 -> qkv where the block has no ``proj`` (norm1 there also feeds ``proj``, whose output is
max-pooled into the next stage's stream: both read it per tensor, unfolded). The head's norm feeds its
``fc`` alone too, but ``fc`` reads one pooled vector an image, as in the other families per tensor.

Units: the patch embedding (with the position embedding and the unroll), every block, the head.

No rotation: where a stage begins the residual stream is max-pooled channel by channel (``proj``'s
output, or the stream itself without ``proj``), as is q in that block's attention, and a per-channel
maximum does not commute with a rotation of the channels.

Refused: a patch embedding other than a Conv2d (the video models' Conv3d), blocks of another kind,
norms other than LayerNorm, a head other than timm's pool -> norm -> fc (without a hidden layer).

``HieraDet`` (SAM 2's image encoder) is ``hieradet.py``; it shares ``check_head`` and ``wrap_head``
with this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import timm.layers
import torch
from timm.layers import Mlp
from torch import nn

from ..errors import IsvitError
from ..modules import QuantConv2d, QuantLinear, QuantMatMul
from .base import Family, Head, Unit, check_layernorm, numbered_blocks, wrap_mlp

try:  # every timm 1.0 release the package index offers (1.0.3 on) has Hiera
    import timm.models.hiera as timm_hiera
    from timm.models.hiera import Hiera as TimmHiera
    from timm.models.hiera import HieraBlock, MaskUnitAttention
except ImportError:  # pragma: no cover - an older timm has no Hiera: the family matches no model
    timm_hiera = TimmHiera = HieraBlock = MaskUnitAttention = None

if TYPE_CHECKING:
    from ..wrap import Placement

# The heads Hiera and HieraDet build: pool -> norm -> (hidden layer) -> fc; timm 1.0.3-1.0.8's Hiera
# had a NormClassifierHead of its own (pool -> norm -> fc).
HEAD_TYPES = tuple(t for t in (getattr(timm.layers, "ClNormMlpClassifierHead", None),
                               getattr(timm_hiera, "NormClassifierHead", None)) if t is not None)


class Hiera(Family):
    name = "hiera"
    description = "Hiera"
    model_types = tuple(t for t in (TimmHiera,) if t is not None)
    block_types = tuple(t for t in (HieraBlock,) if t is not None)
    no_rotation = ("where a stage begins it max-pools the residual stream (and q) channel by channel, and a "
                   "per-channel maximum does not commute with a rotation of the channels")

    def check(self, model: nn.Module) -> None:
        if not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise IsvitError(f"patch_embed.proj is a {type(model.patch_embed.proj).__name__}; isvit supports "
                             "image Hiera models (a Conv2d patch embedding), not video ones")
        check_blocks(model, HieraBlock, MaskUnitAttention)
        check_head(model)

    def wrap(self, model: nn.Module, p: Placement) -> None:
        wrap_blocks(model, p, QuantMaskUnitAttention, folds_norm1)

    def units(self, model: nn.Module) -> list[Unit]:
        def embed_tokens(x):  # forward_features without a mask
            return model.unroll(model._pos_embed(x))

        units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
        units += [Unit(name, block) for name, block in numbered_blocks(model)]
        units.append(Unit("head", Head(model)))
        return units

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return block_pairs(model, folds_norm1)


def folds_norm1(block: nn.Module) -> bool:
    """norm1 -> qkv is a fold pair: norm1 feeds qkv alone (no dim-changing ``proj`` reads it too)."""
    return block_proj(block) is None


def wrap_blocks(model: nn.Module, p: Placement, attention: type[nn.Module], folds) -> None:
    """Hiera's and HieraDet's surgery: the patch embedding, each block's dim-changing ``proj`` (per
    tensor), its attention as ``attention`` (qkv post-LayerNorm where ``folds(block)``, else
    per tensor: norm1 then feeds more than qkv, or windows pad its output with zeros), its MLP, the head."""
    model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
    for _, block in numbered_blocks(model):
        if block_proj(block) is not None:
            block.proj = p.linear(block.proj, "tensor")
        qk, av = p.matmuls()
        block.attn = attention(block.attn, p.linear(block.attn.qkv, "post_ln" if folds(block) else "tensor"),
                               p.linear(block.attn.proj, "tensor"), qk, av)
        wrap_mlp(block, p)
    wrap_head(model, p)


def block_pairs(model: nn.Module, folds) -> list[tuple[str, nn.Module, QuantLinear]]:
    """Each block's norm2 -> fc1, and norm1 -> qkv where ``folds(block)``."""
    pairs = []
    for name, block in numbered_blocks(model):
        if folds(block):
            pairs.append((f"{name}.norm1", block.norm1, block.attn.qkv))
        pairs.append((f"{name}.norm2", block.norm2, block.mlp.fc1))
    return pairs


def block_proj(block: nn.Module) -> nn.Linear | None:
    """The block's dim-changing Linear, which reads norm1's output as qkv does (None where the block
    keeps its width, or, with ``use_expand_proj=False``, pools the stream itself)."""
    proj = getattr(block, "proj", None)
    return proj if isinstance(proj, nn.Linear) else None


def check_blocks(model: nn.Module, block_type: type, attention_type: type, check_attention=None) -> None:
    """Every block is a ``block_type`` with an ``attention_type`` (then ``check_attention(name, attn)``,
    if given), LayerNorms and timm's plain Mlp: what Hiera's and HieraDet's surgery carries."""
    for name, block in numbered_blocks(model):
        if type(block) is not block_type or type(block.attn) is not attention_type:
            raise IsvitError(f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; "
                             f"isvit supports timm's {block_type.__name__} with {attention_type.__name__}")
        if check_attention is not None:
            check_attention(name, block.attn)
        check_layernorm(block.norm1, f"{name}.norm1")
        check_layernorm(block.norm2, f"{name}.norm2")
        check_plain_mlp(name, block.mlp)


def check_plain_mlp(name: str, mlp: nn.Module) -> None:
    """timm's Mlp of two Linears, without a sub-LayerNorm (what Hiera's and HieraDet's blocks build)."""
    if type(mlp) is not Mlp or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise IsvitError(f"{name}.mlp is a {type(mlp).__name__}; isvit supports timm's Mlp (fc1, fc2) there")


def check_head(model: nn.Module) -> None:
    """The head pools, normalises (LayerNorm or nothing) and classifies with ``fc`` (Identity without
    classes); a hidden layer (``pre_logits``) is refused."""
    head = model.head
    if not isinstance(head, HEAD_TYPES):
        raise IsvitError(f"head is a {type(head).__name__}; isvit supports timm's ClNormMlpClassifierHead there")
    if not isinstance(getattr(head, "pre_logits", nn.Identity()), nn.Identity):
        raise IsvitError("the head has a hidden layer (pre_logits), which isvit does not quantize")
    if not isinstance(head.norm, (nn.LayerNorm, nn.Identity)):
        raise IsvitError(f"head.norm is a {type(head.norm).__name__}; isvit needs LayerNorm (or none) there")


def wrap_head(model: nn.Module, p: Placement) -> None:
    """The head's ``fc`` quantized, its input per tensor: it reads one pooled vector an image, too few
    samples a channel for a per-channel grid (so its norm -> fc is no fold pair)."""
    if isinstance(model.head.fc, nn.Linear):
        model.head.fc = p.linear(model.head.fc, "tensor")


class QuantMaskUnitAttention(nn.Module):
    """Hiera's attention (timm ``MaskUnitAttention``) with quantized products.

    The unrolled tokens (B, N, C) are attended within each mask unit (``use_mask_unit_attn``) or all
    together (one window); where the block pools (``q_stride`` > 1), q is max-pooled over the unit's
    ``q_stride`` groups of tokens (what ``Unroll`` lays out for it) before ``q @ k^T``, in float.
    Shapes: q, k, v (B, heads, windows, tokens, head_dim), timm's layout.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        self.heads, self.head_dim, self.dim_out = attn.heads, attn.head_dim, attn.dim_out
        self.q_stride, self.window_size = attn.q_stride, attn.window_size  # HieraBlock reads q_stride
        self.use_mask_unit_attn = attn.use_mask_unit_attn
        self.scale = attn.scale
        self.qkv, self.proj = qkv, proj
        self.qk, self.av = qk, av

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        num_windows = N // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1
        qkv = self.qkv(x).reshape(B, -1, num_windows, 3, self.heads, self.head_dim).permute(3, 0, 4, 2, 1, 5)
        q, k, v = qkv.unbind(0)
        if self.q_stride > 1:  # max pooling over the mask unit (Unroll puts the pooled tokens q_stride apart)
            q = q.view(B, self.heads, num_windows, self.q_stride, -1, self.head_dim).amax(dim=3)
        attn = self.qk(q * self.scale, k.transpose(-1, -2)).softmax(dim=-1)
        x = self.av(attn, v).transpose(1, 3).reshape(B, -1, self.dim_out)
        return self.proj(x)
