"""Model surgery: where each quantizer goes, one function per architecture.

Placement (method.md):

- weights of every Linear (qkv, proj, fc1, fc2, head, Swin ``reduction``) and of the patch-embed
  Conv2d: uniform, per output channel, ``w_bits``;
- activations at ``a_bits``: inputs of ``qkv`` and ``fc1`` (post-LayerNorm) per channel when
  ``post_ln_per_channel`` (per tensor otherwise); inputs of ``proj``, ``fc2``, ``head`` and
  ``reduction`` per tensor (with ``outlier_ratio``, their outlier channels on a second grid); both
  operands of ``q @ k^T`` and ``v`` per tensor; the post-Softmax map with the quantizer named by
  ``softmax_quantizer``;
- the image, LayerNorm, Softmax, GELU, residual adds, cls token / position embedding and Swin's
  relative position bias and mask stay floating point.

Supported: timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT) with the standard pre-norm
``Block``, and ``SwinTransformer``. Anything else is refused with a clear error rather than
quantized half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention

# Attention moved to timm.layers in later 1.0 releases; vision_transformer has it in all of them.
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from .errors import IsvitError
from .modules import QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantWindowAttention, RMSNorm
from .quantizers import ACTIVATION_PERCENTILES, WEIGHT_PERCENTILES, Quantizer, UniformQuantizer, make_softmax_quantizer


@dataclass(frozen=True)
class Placement:
    """What to build: bit-widths and the two choices the methods differ in."""

    w_bits: int
    a_bits: int
    softmax_quantizer: str = "sulq"
    post_ln_per_channel: bool = True
    # > 0: the per-tensor inputs of proj, fc2, head and reduction set their outlier channels apart
    # (quantizers.search_split_range); the post-LayerNorm ones are left to the fold
    outlier_ratio: float = 0.0
    activation_percentiles: tuple[float, ...] = ACTIVATION_PERCENTILES

    def weight(self) -> UniformQuantizer:
        return UniformQuantizer(self.w_bits, per_channel=True, channel_dim=0, percentiles=WEIGHT_PERCENTILES)

    def activation(self, per_channel: bool = False, outlier_ratio: float = 0.0) -> UniformQuantizer:
        return UniformQuantizer(self.a_bits, per_channel=per_channel, channel_dim=-1, outlier_ratio=outlier_ratio,
                                percentiles=self.activation_percentiles)

    def linear(self, linear: nn.Linear, input_granularity: str) -> QuantLinear:
        """``input_granularity``: 'post_ln' (per channel if so placed), 'tensor' or 'none'."""
        if input_granularity == "none":
            input_quantizer = None
        elif input_granularity == "post_ln":  # its channels are the fold's business (reparam.py)
            input_quantizer = self.activation(self.post_ln_per_channel)
        else:
            input_quantizer = self.activation(outlier_ratio=self.outlier_ratio)
        return QuantLinear(linear, self.weight(), input_quantizer)

    def matmuls(self) -> tuple[QuantMatMul, QuantMatMul]:
        qk = QuantMatMul(self.activation(), self.activation())
        av = QuantMatMul(make_softmax_quantizer(self.softmax_quantizer, self.a_bits), self.activation())
        return qk, av


def architecture(model: nn.Module) -> str:
    """'vit' or 'swin'; a clear error for anything isvit cannot wrap."""
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    raise IsvitError(
        f"isvit supports timm VisionTransformer (ViT, DeiT) and SwinTransformer models, not {type(model).__name__}"
    )


def wrap_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Swap quantized modules into ``model`` in place and return it."""
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise IsvitError("the model is already quantized")
    if architecture(model) == "vit":
        _wrap_vit(model, placement)
    else:
        _wrap_swin(model, placement)
    return model


def post_layernorm_pairs(model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
    """(name, LayerNorm (or the RMSNorm of a rotated model), the Linear it alone feeds) for every
    reparameterisable pair of a wrapped model."""
    blocks = _vit_blocks(model) if architecture(model) == "vit" else _swin_blocks(model)
    pairs = []
    for name, block in blocks:
        if not _pads_windows(block):
            pairs.append((f"{name}.norm1", block.norm1, block.attn.qkv))
        pairs.append((f"{name}.norm2", block.norm2, block.mlp.fc1))
    return pairs


def _pads_windows(block: nn.Module) -> bool:
    """True for a Swin block whose token grid is not a multiple of its window: timm pads the
    post-LayerNorm tokens with zeros there, and zeros do not follow the fold's shift, so its
    (norm1, qkv) pair keeps its per-channel quantizer instead of being folded."""
    if not isinstance(block, SwinTransformerBlock):
        return False
    height, width = block.input_resolution
    return bool(height % block.window_size[0] or width % block.window_size[1])


class Unit(nn.Module):
    """One piece of the model's forward pass, optimised as a whole by block reconstruction.

    ``forward`` runs ``pre`` (fixed float glue such as position embedding, or the final norm and
    pooling before the head), then ``body``; ``body`` holds the quantized modules to train.
    Running a model's units in order gives exactly its forward pass.
    """

    def __init__(self, name: str, body: nn.Module, pre=None, post=None):
        super().__init__()
        self.name = name
        self.body = body
        self._pre, self._post = pre, post

    def forward(self, x):
        if self._pre is not None:
            x = self._pre(x)
        x = self.body(x)
        if self._post is not None:
            x = self._post(x)
        return x


def forward_units(model: nn.Module) -> list[Unit]:
    """The model's forward pass cut into reconstruction units, in order: patch embedding, every
    transformer block (and Swin's patch merging as a single layer), the head."""
    if architecture(model) == "vit":
        def embed_tokens(x):
            return model.norm_pre(model.patch_drop(model._pos_embed(x)))

        units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
        units += [Unit(name, block) for name, block in _vit_blocks(model)]
        units.append(Unit("head", _Head(model), pre=model.norm))
        return units
    units = [Unit("patch_embed", model.patch_embed)]
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            units.append(Unit(f"layers.{i}.downsample", stage.downsample))
        units += [Unit(f"layers.{i}.blocks.{j}", block) for j, block in enumerate(stage.blocks)]
    units.append(Unit("head", _Head(model), pre=model.norm))
    return units


class _Head(nn.Module):
    """``model.forward_head`` as a module whose parameters are the head's (pooling, fc_norm, head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(
            m for m in (getattr(model, n, None) for n in ("fc_norm", "head", "head_dist")) if isinstance(m, nn.Module)
        )
        self._forward_head = model.forward_head

    def forward(self, x):
        return self._forward_head(x)


# ---------------------------------------------------------------------------------------------
# ViT / DeiT
# ---------------------------------------------------------------------------------------------

def _vit_blocks(model) -> list[tuple[str, nn.Module]]:
    return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def _check_layernorm(norm: nn.Module, where: str) -> None:
    """A LayerNorm, or the RMSNorm (or RotatedLayerNorm) that took its place in a rotated model
    (rotate.py): both have the per-channel ``weight`` and ``bias`` the post-LayerNorm fold writes into."""
    if not isinstance(norm, (nn.LayerNorm, RMSNorm)):
        raise IsvitError(f"{where} is a {type(norm).__name__}; isvit needs LayerNorm there")


def check_vit_block(name: str, block: nn.Module) -> None:
    """The block must be timm's standard pre-norm ``Block`` with ``Attention``."""
    if type(block) is not Block or type(block.attn) is not Attention:
        raise IsvitError(
            f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; isvit supports the "
            "standard pre-norm ViT block (timm Block with Attention)"
        )


def _wrap_vit(model: VisionTransformer, p: Placement) -> None:
    model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
    for name, block in _vit_blocks(model):
        check_vit_block(name, block)
        _check_layernorm(block.norm1, f"{name}.norm1")
        _check_layernorm(block.norm2, f"{name}.norm2")
        qk, av = p.matmuls()
        block.attn = QuantAttention(
            block.attn, p.linear(block.attn.qkv, "post_ln"), p.linear(block.attn.proj, "tensor"), qk, av
        )
        block.mlp.fc1 = p.linear(block.mlp.fc1, "post_ln")
        block.mlp.fc2 = p.linear(block.mlp.fc2, "tensor")
    for head in ("head", "head_dist"):
        if isinstance(getattr(model, head, None), nn.Linear):
            setattr(model, head, p.linear(getattr(model, head), "tensor"))


# ---------------------------------------------------------------------------------------------
# Swin
# ---------------------------------------------------------------------------------------------

def _swin_blocks(model) -> list[tuple[str, nn.Module]]:
    return [
        (f"layers.{i}.blocks.{j}", block)
        for i, stage in enumerate(model.layers)
        for j, block in enumerate(stage.blocks)
    ]


def check_swin_block(name: str, block: nn.Module) -> None:
    """The block must be timm's ``SwinTransformerBlock`` with ``WindowAttention``."""
    if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
        raise IsvitError(f"{name} is a {type(block).__name__}; isvit supports timm's SwinTransformerBlock")


def _wrap_swin(model: SwinTransformer, p: Placement) -> None:
    model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
    for i, stage in enumerate(model.layers):
        if isinstance(stage.downsample, PatchMerging):
            stage.downsample.reduction = p.linear(stage.downsample.reduction, "tensor")
    for name, block in _swin_blocks(model):
        check_swin_block(name, block)
        _check_layernorm(block.norm1, f"{name}.norm1")
        _check_layernorm(block.norm2, f"{name}.norm2")
        qk, av = p.matmuls()
        block.attn = QuantWindowAttention(
            block.attn, p.linear(block.attn.qkv, "post_ln"), p.linear(block.attn.proj, "tensor"), qk, av
        )
        block.mlp.fc1 = p.linear(block.mlp.fc1, "post_ln")
        block.mlp.fc2 = p.linear(block.mlp.fc2, "tensor")
    if isinstance(getattr(model.head, "fc", None), nn.Linear):
        model.head.fc = p.linear(model.head.fc, "tensor")
