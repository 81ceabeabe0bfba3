"""timm's ``NaFlexVit`` (SigLIP 2 NaFlex and timm's NaFlex ViTs): ViT blocks over a variable
number of patches, taken either as NCHW images or as a NaFlex dict (``patches``, ``patch_coord``,
``patch_valid``) whose padded patches are masked.

Its blocks are timm's ``Block`` with ``Attention``, quantized as the ViT adapter quantizes them
(``vit.wrap_block``: ``QuantAttention``, qkv and fc1 post-LayerNorm, a SwiGLU's two input Linears
as one); the fold pairs are each block's norm1 -> qkv and norm2 -> fc1. The patch embedding
(``embeds.proj``: a Linear over flattened patches, or a Conv2d) has its weight quantized and reads
the float pixels; the head is quantized per tensor. Position embedding, prefix tokens, pooling (the
attention pool ``global_pool='map'`` included, as the ViT adapter leaves SigLIP's) and the norms
stay floating point.

Padding: isvit calibrates on NCHW images, which have none, and every quantizer's grid is fixed once
calibrated, so nothing in the quantized model depends on the padding of a batch: the attention
adds timm's mask before Softmax and gives a key masked for every query no weight in the quantized
map either (``vit.attended_keys``); timm's pooling masks padded patches itself (average over the
valid ones; the attention pool with its own mask, in float); padded patches' tokens are computed
but read by nothing.

Refused: blocks other than the ViT's (the EVA blocks that rotary embeddings, a SwiGLU config or
gated attention bring); the patch-size interpolator (``enable_patch_interpolator``), which applies
the projection's weight itself and so would bypass its quantizer.

Rotation: the ViT's recipe (``vit.rotate_stream``), with NaFlexVit's embedding in place of the
ViT's: the projection and the prefix tokens and position embedding (learned, or factorized in two
tables) are the writers; interpolating the position embedding to another grid, per channel, commutes
with the rotation, and so does the masked average pooling. Padded patches (the projection's bias
only) are written rotated like any other token and are still masked.

Hugging Face transformers' SigLIP 2 NaFlex vision tower (``Siglip2VisionModel``, and the vision
tower of ``Siglip2Model``) -> NaFlexVit (``naflexvit_base_patch16_siglip`` ...): transformers embeds
patches that its image processor has already cut out, each flattened as (row, column, channel),
with a Linear, as NaFlexVit does (``embeds.proj``, its ``batch_patchify`` in the same order), so the
weight moves as it is. The learned position embedding is a square grid of ``num_patches`` in both
(transformers keeps it as ``num_patches`` rows, timm as ``(1, H, W, C)``), resized to each image's
grid of patches by antialiased bilinear interpolation in both: at the grid's own size neither
resizes, at another they interpolate the same way (tests/test_hf.py). The rest (blocks, final norm,
attention-pool head) is SigLIP's (``vit.siglip_tower``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from timm.models.vision_transformer import Block
from torch import nn

try:
    from timm.models.naflexvit import NaFlexVit
except ImportError:  # an older timm, without NaFlexVit: the family matches no model (and is not registered)
    NaFlexVit = None

from ..errors import IsvitError
from ..modules import QuantConv2d, QuantLinear
from .base import Family, Head, Unit, numbered_blocks
from .vit import Embedding, block_pairs, check_block, check_rotation, rotate_stream, siglip_tower, wrap_block

if TYPE_CHECKING:
    from ..hf import Renaming
    from ..wrap import Placement


class Embeds(nn.Module):
    """``model.embeds`` then ``model.norm_pre`` as a unit's body whose parameters are the
    projection's and its norm's, as a ViT's ``patch_embed`` (the position embedding and the prefix
    tokens stay fixed, as the ViT's do)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList([model.embeds.proj, model.embeds.norm])
        self._forward = lambda x: model.norm_pre(model.embeds(x)[0])  # not submodules: the model holds them

    def forward(self, x):
        return self._forward(x)


class NaFlex(Family):
    name = "naflexvit"
    description = "NaFlexVit"
    model_types = tuple(t for t in (NaFlexVit,) if t is not None)
    block_types = (Block,)
    rotation_name = "NaFlexVit"
    # transformers' task models (Siglip2Model ...) and 4.x's saved Siglip2VisionModel: as SigLIP's
    transformers_prefixes = ("vision_model.",)
    transformers_names = ("SigLIP 2 NaFlex",)

    def check(self, model: nn.Module) -> None:
        for name, block in numbered_blocks(model):
            check_block(name, block)
        if getattr(model.embeds, "patch_interpolator", None) is not None:
            raise IsvitError("the model resizes its patch embedding per input (enable_patch_interpolator), which "
                             "bypasses the quantized projection")
        if not isinstance(model.embeds.proj, (nn.Linear, nn.Conv2d)):
            raise IsvitError(f"embeds.proj is a {type(model.embeds.proj).__name__}; isvit needs a Linear or Conv2d there")

    def wrap(self, model: nn.Module, p: Placement) -> None:
        proj = model.embeds.proj
        if isinstance(proj, nn.Conv2d):
            model.embeds.proj = QuantConv2d(proj, p.weight())
        else:  # flattened patches of the float image: no input quantizer, as the Conv2d's
            model.embeds.proj = p.linear(proj, "none")
        for _, block in numbered_blocks(model):
            wrap_block(block, p)
        if isinstance(model.head, nn.Linear):
            model.head = p.linear(model.head, "tensor")

    def units(self, model: nn.Module) -> list[Unit]:
        units = [Unit("embeds", Embeds(model))]
        units += [Unit(name, block) for name, block in numbered_blocks(model)]
        units.append(Unit("head", Head(model), pre=model.norm))
        return units

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return [pair for name, block in numbered_blocks(model) for pair in block_pairs(name, block)]

    def check_rotation(self, model: nn.Module) -> None:
        check_rotation(model, _embedding(model))

    def rotate(self, model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return rotate_stream(model, _embedding(model), generator)

    def from_transformers(self, keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor] | None:
        # SigLIP's layout (encoder.layers.{i}.layer_norm1) with a Linear patch embedding
        patch = keys.left.get(f"{keys.prefix}embeddings.patch_embedding.weight")
        if not keys.has("encoder.layers.0.layer_norm1.weight") or patch is None or patch.dim() != 2:
            return None
        return _siglip2_naflex(keys, model, path)

    def config_args(self, config: dict, model: nn.Module, where: str) -> dict:
        # SigLIP 2 NaFlex's learned position embedding: num_patches on a square grid
        patches = config.get("num_patches")
        if patches is None:
            return {}
        side = math.isqrt(patches) if isinstance(patches, int) and not isinstance(patches, bool) and patches > 0 else 0
        if side * side != patches:
            raise IsvitError(f"{where} has num_patches {patches!r}, not a square grid, which timm's NaFlexVit needs")
        grid = getattr(model.embeds, "pos_embed_grid_size", None)
        return {} if grid is not None and tuple(grid) == (side, side) else {"pos_embed_grid_size": [side, side]}


def _embedding(model: nn.Module) -> Embedding:
    """NaFlexVit's writers of the stream before the first block (``vit.Embedding``)."""
    embeds = model.embeds
    tokens = [getattr(embeds, n, None) for n in ("cls_token", "reg_token", "pos_embed", "pos_embed_y", "pos_embed_x")]
    return Embedding(proj=embeds.proj, norm_owner=embeds, tokens=[t for t in tokens if isinstance(t, nn.Parameter)],
                     dim=model.embed_dim)


def _siglip2_naflex(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """transformers' SigLIP 2 NaFlex checkpoint under the NaFlexVit's timm names (module docstring)."""
    p = keys.prefix
    keys.move_layer(f"{p}embeddings.patch_embedding", "embeds.proj")
    pos = keys.take(f"{p}embeddings.position_embedding.weight")
    if pos is not None:
        side = math.isqrt(pos.shape[0])
        if side * side != pos.shape[0]:
            raise IsvitError(f"weights file {path} holds a SigLIP 2 NaFlex model whose {pos.shape[0]} position "
                             "embeddings are not a square grid, which timm's NaFlexVit needs")
        keys.out["embeds.pos_embed"] = pos.reshape(1, side, side, pos.shape[1])
    return siglip_tower(keys, model, path)
