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
``Block``, ``SwinTransformer``, ``SwinTransformerV2``, ``Beit`` and ``Eva`` (EVA-02).

- BEiT and EVA: ``qkv`` takes the separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one
  bias (EVA's separate ``q_proj`` / ``k_proj`` / ``v_proj`` become one ``qkv``); a SwiGLU MLP's
  ``fc1_g`` and ``fc1_x`` become one ``fc1`` (modules.QuantSwiGLU); a sub-LayerNorm (EVA's
  ``attn.norm``, an MLP's ``norm``) makes the Linear after it a post-LayerNorm one, folded like
  ``qkv`` and ``fc1``; relative position biases, rotary embeddings and LayerScale stay floating point.
- Swin V2's blocks are post-norm (the LayerNorm comes after the Linear, whose input is the
  residual stream): its ``qkv``, ``fc1`` and ``reduction`` inputs are per tensor and it has no pair
  for the fold; its logit scale and continuous position bias MLP (``cpb_mlp``) stay floating point.

Anything else is refused with a clear error rather than quantized half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models import beit, eva, swin_transformer_v2
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention

# Attention moved to timm.layers in later 1.0 releases; vision_transformer has it in all of them.
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from .errors import IsvitError
from .modules import (
    QuantAttention,
    QuantBeitAttention,
    QuantConv2d,
    QuantCosineWindowAttention,
    QuantEvaAttention,
    QuantLinear,
    QuantMatMul,
    QuantSwiGLU,
    QuantWindowAttention,
    RMSNorm,
)
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
    """'vit', 'swin', 'swinv2', 'beit' or 'eva'; a clear error for anything isvit cannot wrap."""
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, swin_transformer_v2.SwinTransformerV2):
        return "swinv2"
    if isinstance(model, beit.Beit):
        return "beit"
    if isinstance(model, eva.Eva):
        return "eva"
    raise IsvitError(
        "isvit supports timm VisionTransformer (ViT, DeiT), SwinTransformer, SwinTransformerV2, Beit and Eva models, "
        f"not {type(model).__name__}"
    )


def check_supported(model: nn.Module) -> str:
    """``architecture(model)`` of a model not yet wrapped, after checking what its family's surgery
    needs (BEiT, EVA, Swin V2: everything a one-sentence ``IsvitError`` refuses is found here,
    before any module is swapped and before any calibration work)."""
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise IsvitError("the model is already quantized")
    arch = architecture(model)
    _check_family(model, arch)
    return arch


def wrap_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Swap quantized modules into ``model`` in place and return it."""
    arch = check_supported(model)
    wrap = {"vit": _wrap_vit, "swin": _wrap_swin, "swinv2": _wrap_swinv2, "beit": _wrap_beit, "eva": _wrap_eva}
    wrap[arch](model, placement)
    return model


def _check_family(model: nn.Module, arch: str) -> None:
    if arch == "vit":
        _check_vit(model)
    elif arch == "beit":
        _check_beit(model)
    elif arch == "eva":
        _check_eva(model)
    elif arch == "swinv2":
        _check_swinv2(model)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return _swin_blocks(model) if architecture(model) in ("swin", "swinv2") else _vit_blocks(model)


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` (a unit's body) is a transformer block of a supported family."""
    return isinstance(module, (Block, SwinTransformerBlock, swin_transformer_v2.SwinTransformerV2Block, beit.Block,
                               eva.EvaBlock, _RopeBlock))


def post_layernorm_pairs(model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
    """(name, LayerNorm (or the RMSNorm of a rotated model), the Linear it alone feeds) for every
    reparameterisable pair of a wrapped model: each block's norm1 -> qkv and norm2 -> fc1, and for
    BEiT and EVA each sub-LayerNorm and the Linear after it (attn.norm -> proj, mlp.norm -> fc2).
    None for Swin V2: its post-norm blocks' LayerNorms come after the Linears, never before one."""
    arch = architecture(model)
    if arch == "swinv2":
        return []
    inner = arch in ("beit", "eva")
    pairs = []
    for name, block in _blocks(model):
        if not _pads_windows(block):
            pairs.append((f"{name}.norm1", block.norm1, block.attn.qkv))
        pairs.append((f"{name}.norm2", block.norm2, block.mlp.fc1))
        if inner:
            for where, norm, linear in ((f"{name}.attn.norm", getattr(block.attn, "norm", None), block.attn.proj),
                                        (f"{name}.mlp.norm", block.mlp.norm, block.mlp.fc2)):
                if isinstance(norm, nn.LayerNorm):
                    pairs.append((where, norm, linear))
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
    arch = architecture(model)
    if arch == "beit":
        return _beit_units(model)
    if arch == "eva":
        return _eva_units(model)
    if arch == "vit":
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
    """The block must be timm's standard pre-norm ``Block`` with ``Attention`` and an MLP of two
    Linears ``fc1`` and ``fc2`` (timm's Mlp or GluMlp; a SwiGLU's ``fc1_g``/``fc1_x`` are not)."""
    if type(block) is not Block or type(block.attn) is not Attention:
        raise IsvitError(
            f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; isvit supports the "
            "standard pre-norm ViT block (timm Block with Attention)"
        )
    if not all(isinstance(getattr(block.mlp, fc, None), nn.Linear) for fc in ("fc1", "fc2")):
        raise IsvitError(f"{name}.mlp is a {type(block.mlp).__name__}; isvit supports an MLP of two Linears "
                         "fc1 and fc2 (timm's Mlp or GluMlp) in a ViT block")


def _check_vit(model: VisionTransformer) -> None:
    for name, block in _vit_blocks(model):
        check_vit_block(name, block)
        _check_layernorm(block.norm1, f"{name}.norm1")
        _check_layernorm(block.norm2, f"{name}.norm2")


def _wrap_vit(model: VisionTransformer, p: Placement) -> None:
    model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
    for _, block in _vit_blocks(model):
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


# ---------------------------------------------------------------------------------------------
# BEiT and EVA: shared pieces
# ---------------------------------------------------------------------------------------------

def _single_bias_qkv(attn: nn.Module) -> nn.Linear:
    """``attn.qkv`` with BEiT's / EVA's separate ``q_bias``, zero ``k_bias`` and ``v_bias`` as its
    own bias: the same ``F.linear(x, W, cat(q_bias, k_bias, v_bias))`` timm computes."""
    qkv = attn.qkv
    if qkv is None:  # EVA with qkv_fused=False: q_proj, k_proj (no bias), v_proj
        return _joined_linear(attn.q_proj, attn.k_proj, attn.v_proj)
    if getattr(attn, "q_bias", None) is None:
        return qkv
    linear = nn.Linear(qkv.in_features, qkv.out_features, bias=False, device=qkv.weight.device, dtype=qkv.weight.dtype)
    linear.weight = qkv.weight
    linear.bias = nn.Parameter(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach().clone())
    return linear


def _joined_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing ``cat([linear(x) for linear in linears], -1)``."""
    w = linears[0].weight
    linear = nn.Linear(w.shape[1], sum(lin.out_features for lin in linears), bias=False, device=w.device, dtype=w.dtype)
    linear.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]).detach().clone())
    biases = [lin.bias if lin.bias is not None else torch.zeros(lin.out_features, device=w.device, dtype=w.dtype)
              for lin in linears]
    linear.bias = nn.Parameter(torch.cat(biases).detach().clone())
    return linear


def _after_norm(norm: nn.Module) -> str:
    """The input granularity of a Linear that reads ``norm``'s output: 'post_ln' after a LayerNorm."""
    return "post_ln" if isinstance(norm, nn.LayerNorm) else "tensor"


def _check_mlp(name: str, mlp: nn.Module) -> None:
    if type(mlp) not in (Mlp, GluMlp, SwiGLU) or not isinstance(getattr(mlp, "fc2", None), nn.Linear):
        raise IsvitError(f"{name}.mlp is a {type(mlp).__name__}; isvit supports timm's Mlp, GluMlp and SwiGLU there")
    if not isinstance(mlp.norm, (nn.LayerNorm, nn.Identity)):
        raise IsvitError(f"{name}.mlp.norm is a {type(mlp.norm).__name__}; isvit needs LayerNorm (or none) there")


def _wrap_mlp(block: nn.Module, p: Placement) -> None:
    """``block.mlp``'s Linears quantized: fc1 after norm2, fc2 after the MLP's own norm (if any)."""
    mlp = block.mlp
    fc2 = p.linear(mlp.fc2, _after_norm(mlp.norm))
    if isinstance(mlp, SwiGLU):
        block.mlp = QuantSwiGLU(mlp, p.linear(_joined_linear(mlp.fc1_g, mlp.fc1_x), "post_ln"), fc2)
    else:
        mlp.fc1, mlp.fc2 = p.linear(mlp.fc1, "post_ln"), fc2


def _wrap_token_blocks(model: nn.Module, p: Placement, quant_attention: type[nn.Module]) -> None:
    """BEiT's or EVA's surgery (they differ in the attention module only): the patch embedding,
    each block's attention as ``quant_attention`` with one ``qkv`` (post-LayerNorm) and a ``proj``
    that is post-LayerNorm behind EVA's sub-LayerNorm (BEiT has none), the MLP, the head."""
    model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
    for _, block in _vit_blocks(model):
        qk, av = p.matmuls()
        attn = block.attn
        qkv = p.linear(_single_bias_qkv(attn), "post_ln")
        proj = p.linear(attn.proj, _after_norm(getattr(attn, "norm", None)))
        block.attn = quant_attention(attn, qkv, proj, qk, av)
        _wrap_mlp(block, p)
    if isinstance(model.head, nn.Linear):
        model.head = p.linear(model.head, "tensor")


# ---------------------------------------------------------------------------------------------
# BEiT
# ---------------------------------------------------------------------------------------------

def _check_beit(model: nn.Module) -> None:
    if model.rel_pos_bias is not None:
        raise IsvitError("the model shares one relative position bias among its blocks "
                         "(use_shared_rel_pos_bias), which isvit does not support; it takes a bias per block")
    for name, block in _vit_blocks(model):
        if type(block) is not beit.Block or type(block.attn) is not beit.Attention:
            raise IsvitError(f"{name} is a {type(block).__name__}; isvit supports timm's BEiT Block with its Attention")
        _check_layernorm(block.norm1, f"{name}.norm1")
        _check_layernorm(block.norm2, f"{name}.norm2")
        _check_mlp(name, block.mlp)


def _wrap_beit(model: nn.Module, p: Placement) -> None:
    _wrap_token_blocks(model, p, QuantBeitAttention)


def _beit_units(model: nn.Module) -> list[Unit]:
    def embed_tokens(x):
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)

    units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
    units += [Unit(name, block) for name, block in _vit_blocks(model)]
    units.append(Unit("head", _Head(model), pre=model.norm))
    return units


# ---------------------------------------------------------------------------------------------
# EVA (EVA-02)
# ---------------------------------------------------------------------------------------------

def _check_eva(model: nn.Module) -> None:
    if getattr(model, "dynamic_img_size", False):
        raise IsvitError("the model takes dynamic image sizes (dynamic_img_size), which isvit does not support for EVA")
    if getattr(model, "rope_mixed", False):
        raise IsvitError("the model has a rotary embedding per block (rope_type mixed), which isvit does not support")
    if getattr(model, "attn_pool", None) is not None:
        raise IsvitError("the model pools with an attention pool (global_pool='map'), which isvit does not quantize for EVA")
    for name, block in _vit_blocks(model):
        if type(block) is not eva.EvaBlock or type(block.attn) is not eva.EvaAttention:
            raise IsvitError(f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; "
                             "isvit supports timm's pre-norm EvaBlock with EvaAttention")
        if getattr(block.attn, "gate", None) is not None:
            raise IsvitError(f"{name}.attn is gated (gated_attn), which isvit does not support")
        _check_layernorm(block.norm1, f"{name}.norm1")
        _check_layernorm(block.norm2, f"{name}.norm2")
        attn_norm = getattr(block.attn, "norm", nn.Identity())
        if not isinstance(attn_norm, (nn.LayerNorm, nn.Identity)):
            raise IsvitError(f"{name}.attn.norm is a {type(attn_norm).__name__}; isvit needs LayerNorm (or none) there")
        _check_mlp(name, block.mlp)


def _wrap_eva(model: nn.Module, p: Placement) -> None:
    _wrap_token_blocks(model, p, QuantEvaAttention)


def _eva_rope(model: nn.Module) -> torch.Tensor | None:
    """The rotary embedding ``Eva._pos_embed`` hands every block (fixed image size, eval mode)."""
    if model.rope is None:
        return None
    if hasattr(model.rope, "feat_shape"):
        return model.rope.get_embed()
    return model.rope.get_embed(shape=model.patch_embed.grid_size)


class _RopeBlock(nn.Module):
    """An EVA block as a unit's body: ``block(x, rope=...)`` with the model's rotary embedding."""

    def __init__(self, block: nn.Module, model: nn.Module):
        super().__init__()
        self.block = block
        self._rope = lambda: _eva_rope(model)  # not a submodule: the model holds the unit

    def forward(self, x):
        return self.block(x, rope=self._rope())


def _eva_units(model: nn.Module) -> list[Unit]:
    def embed_tokens(x):
        return model.norm_pre(model._pos_embed(x)[0])

    units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
    units += [Unit(name, _RopeBlock(block, model)) for name, block in _vit_blocks(model)]
    units.append(Unit("head", _Head(model), pre=model.norm))
    return units


# ---------------------------------------------------------------------------------------------
# Swin V2
# ---------------------------------------------------------------------------------------------

def _check_swinv2(model: nn.Module) -> None:
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, (swin_transformer_v2.PatchMerging, nn.Identity)):
            raise IsvitError(f"layers.{i}.downsample is a {type(stage.downsample).__name__}; "
                             "isvit supports Swin V2's PatchMerging there")
    for name, block in _swin_blocks(model):
        if (type(block) is not swin_transformer_v2.SwinTransformerV2Block
                or type(block.attn) is not swin_transformer_v2.WindowAttention or type(block.mlp) is not Mlp):
            raise IsvitError(f"{name} is a {type(block).__name__}; isvit supports timm's SwinTransformerV2Block")


def _wrap_swinv2(model: nn.Module, p: Placement) -> None:
    model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
    for stage in model.layers:
        if isinstance(stage.downsample, swin_transformer_v2.PatchMerging):
            stage.downsample.reduction = p.linear(stage.downsample.reduction, "tensor")
    for _, block in _swin_blocks(model):
        qk, av = p.matmuls()
        attn = block.attn
        block.attn = QuantCosineWindowAttention(
            attn, p.linear(_single_bias_qkv(attn), "tensor"), p.linear(attn.proj, "tensor"), qk, av
        )
        block.mlp.fc1 = p.linear(block.mlp.fc1, "tensor")
        block.mlp.fc2 = p.linear(block.mlp.fc2, "tensor")
    if isinstance(getattr(model.head, "fc", None), nn.Linear):
        model.head.fc = p.linear(model.head.fc, "tensor")
