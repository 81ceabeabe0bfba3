"""timm's ``SwinTransformer`` with its ``SwinTransformerBlock`` and ``WindowAttention``.

Surgery: the patch embedding's Conv2d, each patch merging's ``reduction`` (input per tensor), each
block's attention (as ``QuantWindowAttention``: the relative position bias and the shifted-window
mask stay floating point) and MLP, the head's ``fc``. The fold pairs are each block's
norm1 -> qkv and norm2 -> fc1, but for a block that pads its windows (``pads_windows``).

Rotation (``rotate.rotate_model``; the math in ``orthogonal.py``) differs from ViT's in two ways.

- Stage 0's stream starts at the patch embedding's LayerNorm, whose per-channel weight does not
  commute with a rotation: that stream keeps its basis. Every later stage's stream, written by its
  patch merging's ``reduction``, gets a rotation of its own width.
- Patch merging normalises four neighbouring tokens concatenated (4C channels); the mean over 4C
  keeps the differences between the four tokens' means, which centring the stream would erase. So
  Swin's stream is not centred. Each LayerNorm becomes a ``RotatedLayerNorm``, which removes the
  component along the rotated mean direction ``u Q`` (``u = 1 / sqrt(d)``) where the LayerNorm
  removed the mean: the same LayerNorm, rotated. Patch merging's input is rotated by
  blockdiag(Q, Q, Q, Q) (its mean direction likewise); its ``reduction`` reads with that and writes
  the next stage's stream with the next Q. Zero padding (of windows; of odd grids before merging)
  keeps zeros zero. Where a block pads its windows, the padded tokens are zeros that never got the
  LayerNorm's bias, so ``qkv`` must not get it either: that bias stays in the norm, as ``(beta / gamma) Q``.

Every attention head is rotated as in ViT (``orthogonal.rotate_heads``).

Without a classifier (``num_classes=0``, a feature tower: ``head.fc`` Identity) the last stage's
rotation is undone right after the final ``norm`` (``orthogonal.unrotate``, its affine with it), as
in ViT: ``forward_features`` returns that norm's output (every token) and the pooling after it then
reads the unrotated model's tokens.

Hugging Face transformers checkpoints (``hf.py``): ``SwinModel``, ``SwinForImageClassification``
-> ``SwinTransformer`` (swin_tiny_patch4_window7_224).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from torch import nn

from ..errors import IsvitError
from ..modules import QuantConv2d, QuantLinear, QuantMatMul, window_attention_output
from ..orthogonal import orthogonal_like, read, require_layernorm, rotate_heads, unrotate, write_linear
from .base import Family, Head, Unit, check_layernorm, staged_blocks, staged_units

if TYPE_CHECKING:
    from ..hf import Renaming
    from ..wrap import Placement


class Swin(Family):
    name = "swin"
    description = "SwinTransformer"
    model_types = (SwinTransformer,)
    block_types = (SwinTransformerBlock,)
    rotation_name = "Swin"
    transformers_prefixes = ("swin.",)
    transformers_names = ("Swin",)

    def check(self, model: nn.Module) -> None:
        for i, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
                raise IsvitError(f"layers.{i}.downsample is a {type(stage.downsample).__name__}; "
                                 "isvit supports Swin's PatchMerging there")
        for name, block in staged_blocks(model):
            check_block(name, block)
            check_layernorm(block.norm1, f"{name}.norm1")
            check_layernorm(block.norm2, f"{name}.norm2")

    def wrap(self, model: nn.Module, p: Placement) -> None:
        model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
        for stage in model.layers:
            if isinstance(stage.downsample, PatchMerging):
                stage.downsample.reduction = p.linear(stage.downsample.reduction, "tensor")
        for _, block in staged_blocks(model):
            qk, av = p.matmuls()
            block.attn = QuantWindowAttention(
                block.attn, p.linear(block.attn.qkv, "post_ln"), p.linear(block.attn.proj, "tensor"), qk, av
            )
            block.mlp.fc1 = p.linear(block.mlp.fc1, "post_ln")
            block.mlp.fc2 = p.linear(block.mlp.fc2, "tensor")
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            model.head.fc = p.linear(model.head.fc, "tensor")

    def units(self, model: nn.Module) -> list[Unit]:
        return staged_units(model, Head(model))

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        pairs = []
        for name, block in staged_blocks(model):
            if not pads_windows(block):
                pairs.append((f"{name}.norm1", block.norm1, block.attn.qkv))
            pairs.append((f"{name}.norm2", block.norm2, block.mlp.fc1))
        return pairs

    def check_rotation(self, model: nn.Module) -> None:
        _check_rotation(model)

    def rotate(self, model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return _rotate(model, generator)

    def from_transformers(self, keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor] | None:
        if keys.has("encoder.layers.0.blocks.0.layernorm_before.weight"):  # Swin's marker, in its first block
            return _swin(keys, model)
        return None


def check_block(name: str, block: nn.Module) -> None:
    """The block must be timm's ``SwinTransformerBlock`` with ``WindowAttention``."""
    if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
        raise IsvitError(f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; isvit supports "
                         "timm's SwinTransformerBlock with WindowAttention")


def pads_windows(block: nn.Module) -> bool:
    """True for a block whose token grid is not a multiple of its window: timm pads the
    post-LayerNorm tokens with zeros there, and zeros do not follow the fold's shift, so its
    (norm1, qkv) pair keeps its per-channel quantizer instead of being folded."""
    height, width = block.input_resolution
    return bool(height % block.window_size[0] or width % block.window_size[1])


class QuantWindowAttention(nn.Module):
    """Swin's window attention (timm ``WindowAttention``) with quantized products.

    The relative position bias and the shifted-window mask are added in floating point before the
    Softmax.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.window_area = attn.relative_position_index.shape[0]
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv, self.proj = qkv, proj
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.qk, self.av = qk, av

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.qk(q * self.scale, k.transpose(-2, -1)) + self.relative_position_bias()
        return window_attention_output(self, attn, v, mask)


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------

def _check_rotation(model) -> None:
    for name, block in staged_blocks(model):
        check_block(name, block)
        require_layernorm(block.norm1, f"{name}.norm1")
        require_layernorm(block.norm2, f"{name}.norm2")
        if pads_windows(block) and bool((block.norm1.weight == 0).any()):
            raise IsvitError(f"{name}.norm1 has a zero weight in a block that pads its windows, which rotation cannot carry")
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, (PatchMerging, nn.Identity)):
            raise IsvitError(f"layers.{i}.downsample is a {type(stage.downsample).__name__}; rotation needs PatchMerging")
        if isinstance(stage.downsample, PatchMerging):
            require_layernorm(stage.downsample.norm, f"layers.{i}.downsample.norm")
    require_layernorm(model.norm, "norm")
    classifier = isinstance(model.head.fc, nn.Linear)  # else a feature tower, unrotated before pooling
    if classifier and getattr(model.head.global_pool, "pool_type", None) not in ("avg", ""):
        raise IsvitError("rotation needs average pooling before the head of a Swin")


def _rotate(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
    rotations = {}
    q = None  # stage 0's stream keeps its basis (module docstring)
    for i, stage in enumerate(model.layers):
        merge = stage.downsample
        if isinstance(merge, PatchMerging):
            if q is not None:  # it reads four tokens of a rotated stream: blockdiag(Q, Q, Q, Q)
                merge.norm = read(merge.norm, [merge.reduction], torch.block_diag(*[q] * 4), centred=False)
            q = orthogonal_like(merge.reduction.out_features, generator, merge.reduction.weight)
            rotations[f"layers.{i}"] = q
            write_linear(merge.reduction, q, center=False)
        for block in stage.blocks:
            if q is not None:
                write_linear(block.attn.proj, q, center=False)
                write_linear(block.mlp.fc2, q, center=False)
                block.norm1 = read(block.norm1, [block.attn.qkv], q, centred=False, keep_bias=pads_windows(block))
                block.norm2 = read(block.norm2, [block.mlp.fc1], q, centred=False)
            rotate_heads(block.attn, generator)
    if q is not None and isinstance(model.head.fc, nn.Linear):
        model.norm = read(model.norm, [model.head.fc], q, centred=False)
    elif q is not None:  # a feature tower: the rotation undone right after norm (module docstring)
        model.norm = unrotate(model.norm, q, centred=False)
    return rotations


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers checkpoints
# ---------------------------------------------------------------------------------------------

def _swin(keys: Renaming, model: nn.Module) -> dict[str, torch.Tensor]:
    """SwinModel / SwinForImageClassification -> timm's SwinTransformer."""
    p = keys.prefix
    keys.move_layer(f"{p}embeddings.patch_embeddings.projection", "patch_embed.proj")
    keys.move_layer(f"{p}embeddings.norm", "patch_embed.norm")
    keys.drop(f"{p}embeddings.mask_token")
    # transformers (like the original Swin) ends a stage with its patch merging: stage s's
    # ``downsample`` halves the resolution for stage s + 1. timm (since 0.9) starts stage s + 1 with
    # it instead, so stage s's merging moves one stage on; a timm model with merging in stage 0 has
    # the old layout and keeps the numbers.
    later = 0 if "layers.0.downsample.reduction.weight" in model.state_dict() else 1
    for s in keys.numbers(rf"{re.escape(p)}encoder\.layers\.(\d+)\."):
        stage = f"{p}encoder.layers.{s}."
        for b in keys.numbers(rf"{re.escape(stage)}blocks\.(\d+)\."):
            src, dst = f"{stage}blocks.{b}.", f"layers.{s}.blocks.{b}."
            keys.move_layer(src + "layernorm_before", dst + "norm1")
            attention = src + "attention.self."
            keys.fuse_qkv(attention + "query", attention + "key", attention + "value", dst + "attn.qkv")
            # The learned bias per relative offset in a window; both index it the same way (the
            # original Swin's relative_position_index, which timm recomputes: a buffer it does not save).
            keys.move(attention + "relative_position_bias_table", dst + "attn.relative_position_bias_table")
            keys.drop(attention + "relative_position_index")
            keys.move_layer(src + "attention.output.dense", dst + "attn.proj")
            keys.move_layer(src + "layernorm_after", dst + "norm2")
            keys.move_layer(src + "intermediate.dense", dst + "mlp.fc1")
            keys.move_layer(src + "output.dense", dst + "mlp.fc2")
        # Patch merging concatenates each 2x2 neighbourhood's features in the same order in both,
        # (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1), so its LayerNorm over the
        # 4C channels and its reduction need no permutation.
        keys.move_layer(f"{stage}downsample.norm", f"layers.{s + later}.downsample.norm")
        keys.move(f"{stage}downsample.reduction.weight", f"layers.{s + later}.downsample.reduction.weight")
    keys.move_layer(f"{p}layernorm", "norm")
    # The classifier reads the mean of the last stage's tokens, as timm's head (global average pool, fc).
    keys.move_layer("classifier", "head.fc" if "head.fc.weight" in model.state_dict() else "head")
    return keys.result()
