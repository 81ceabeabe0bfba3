"""timm's ``VisionTransformer``: ViT, DeiT (distilled too), and the variants timm builds as one
(CLIP and SigLIP vision towers, DINOv2, register tokens), with the standard pre-norm ``Block``.

Surgery: the patch embedding's Conv2d, each block's ``Attention`` (as ``QuantAttention``, ``qkv``
post-LayerNorm) and MLP (``fc1`` post-LayerNorm; timm's Mlp or GluMlp, two Linears ``fc1`` and
``fc2``; or timm's SwiGLU, whose ``fc1_g`` and ``fc1_x`` become one ``fc1``, as in AIMv2), the head
and DeiT's ``head_dist``. The fold pairs are each block's norm1 -> qkv and norm2 -> fc1. AIMv2's
norms are timm's RmsNorm, which has no bias for the fold to write into: there qkv and fc1 take their
input per tensor and are not folded (a rotated AIMv2's norms are isvit's RMSNorm, and are folded).
Blocks of another kind are refused.

The attention honours timm's ``attn_mask``; a key masked for every query (padding, as NaFlexVit's
``patch_valid`` makes it, ``families/naflexvit.py``) gets no weight in the quantized attention either
(``attended_keys``).

Rotation (``rotate.rotate_model``; the math in ``orthogonal.py``):

1. The stream is made zero-mean: every writer (patch embedding, cls/dist/reg tokens, position
   embedding, each block's attention ``proj`` and ``fc2``, LayerScale folded into them first) has
   its output centred. Each LayerNorm reading the stream subtracts the token's mean anyway, so
   nothing changes, and from then on ``LayerNorm(x) = gamma * RMSNorm(x) + beta``.
2. Each such LayerNorm's affine goes into the Linears it feeds and the LayerNorm becomes an
   ``RMSNorm`` of weight 1 and bias 0 (parameters still: the post-LayerNorm fold writes into them).
3. The stream is rotated by one Q: writers ``W <- Q^T W``, readers ``W <- W Q``; every attention
   head is rotated (``orthogonal.rotate_heads``). Pooling the tokens by their average commutes with Q.

In a model with a classifier the readers after the last block are the head's: ``norm`` or
``fc_norm`` (after pooling) then ``head`` (and DeiT's ``head_dist``); or, with an attention-pool
head (SigLIP, ``global_pool='map'``), ``norm`` then the pool's ``kv``, so the pool's latent query,
``q``, ``proj``, norm and MLP never see the stream and stay as they are. Three variants differ:

- ``norm_pre`` (CLIP; or, without it, the patch embedding's norm) is a LayerNorm whose output is
  the stream. Its per-channel gamma sits on the stream and does not commute with Q, so its
  affine becomes a writer (``orthogonal.norm_as_writer``: d^2 float multiply-adds a token, once).
  What comes before it (the patch embedding, tokens and position embedding it normalises) is left alone.
- Where a reader takes the stream without a LayerNorm first (``final_norm=False``; ``fc_norm``
  after an attention pool), the stream's mean reaches it, so the stream is not centred: its
  LayerNorms become ``RotatedLayerNorm``s, as in Swin, and that reader reads ``W Q``.
- q/k norms (``qk_norm``), the attention output's and the MLP's inner norms are inside the
  attention or MLP, not on the stream, and stay; ``rotate_heads`` skips what they normalise.
- AIMv2: every norm on the stream is timm's RmsNorm, which does not subtract the mean, so the
  stream is not centred (step 1 is skipped) and needs no centring: ``RMSNorm(x Q) = RMSNorm(x) Q``.
  Each RmsNorm's gamma goes into its readers and it becomes an ``RMSNorm`` of weight 1 and bias 0
  (step 2; from then on the fold has a bias to write into); the patch embedding's RmsNorm, whose
  output is the stream, becomes a writer as above. A SwiGLU's ``fc1_g`` and ``fc1_x`` both read
  norm2's output.

The embedding's parts are named in an ``Embedding`` (the projection, the module whose ``norm``
follows it, the tokens and position embeddings), so that NaFlexVit (``families/naflexvit.py``)
rotates by the same recipe.

A feature tower (no classifier: ``num_classes=0``, ``head`` and ``head_dist`` Identity; how CLIP,
SigLIP and DINOv2 towers are used) has no Linear to read the rotated stream at the end, so the
rotation is undone there: ``norm`` becomes its normalisation then ``Unrotate``, a float d x d product
by ``Q^T`` with norm's affine (``orthogonal.unrotate``; ``Q^T`` alone where ``norm`` is Identity).
It sits right after ``norm``, before pooling, because ``forward_features`` returns ``norm``'s output
(every token, DINOv2's dense features) and whatever pools them (class token, average, max, the
attention pool, then ``fc_norm``) then reads the unrotated model's tokens, unchanged. Where
``norm`` is Identity (``fc_norm`` after average pooling, ``final_norm=False``) ``forward_features``
is the stream itself, whose mean must then come out too: that stream is not centred.

Refused (``IsvitError``, before any weight changes), for a model with a classifier: max pooling (it
does not commute with Q), the parameter-free ``AttentionPoolPrr`` (attention over groups of
channels); for any: norms on the stream of other kinds than the first block's norm1 (LayerNorm, or
RmsNorm throughout), blocks that ``check_block`` refuses.

Hugging Face transformers checkpoints (``hf.py``):

- ViT: ``ViTModel``, ``ViTForImageClassification`` -> ``VisionTransformer`` (e.g. vit_base_patch16_224);
- DeiT: ``DeiTForImageClassificationWithTeacher`` (and ``DeiTForImageClassification``, ``DeiTModel``)
  -> ``VisionTransformerDistilled`` (e.g. deit_base_distilled_patch16_224): a transformers DeiT always
  has the distillation token;
- DINOv2: ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> timm's DINOv2 ViTs (vit_small_patch14_dinov2,
  vit_small_patch14_reg4_dinov2); ``Dinov2ForImageClassification`` is refused (``_dinov2``).
- SigLIP and SigLIP 2 at a fixed resolution: ``SiglipVisionModel`` (also the vision tower of a
  ``SiglipModel``, whose text tower is left out) -> timm's SigLIP ViTs (vit_base_patch16_siglip_224:
  no class token, the attention-pool head); ``SiglipForImageClassification`` -> the same with
  ``global_pool='avg', fc_norm=False``. SigLIP 2's NaFlex ``Siglip2VisionModel`` (a Linear patch
  embedding) is not a VisionTransformer's (timm's NaFlexVit).

transformers' ViT and DeiT configs default to ``layer_norm_eps=1e-12`` where timm uses 1e-6: such a
checkpoint then computes slightly different outputs in timm (differences around 1e-5 of the
features, no change to what it learned).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from timm.layers import AttentionPoolLatent, RmsNorm, SwiGLU

# Attention moved to timm.layers in later 1.0 releases; vision_transformer has it in all of them.
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from ..errors import IsvitError
from ..modules import QuantConv2d, QuantLinear, QuantMatMul, QuantSwiGLU, RMSNorm, additive_mask
from ..orthogonal import (
    fold_layer_scale,
    norm_as_writer,
    orthogonal_like,
    read,
    rotate_heads,
    unrotate,
    write,
    write_linear,
)
from .base import Family, Head, Unit, joined_linear, numbered_blocks

if TYPE_CHECKING:
    from ..hf import Renaming
    from ..wrap import Placement


class ViT(Family):
    name = "vit"
    description = "VisionTransformer (ViT, DeiT)"
    model_types = (VisionTransformer,)
    block_types = (Block,)
    rotation_name = "ViT/DeiT"
    transformers_prefixes = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "vision_model.")
    transformers_names = ("ViT", "DeiT", "DINOv2", "SigLIP")

    def check(self, model: nn.Module) -> None:
        for name, block in numbered_blocks(model):
            check_block(name, block)

    def wrap(self, model: nn.Module, p: Placement) -> None:
        model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
        for _, block in numbered_blocks(model):
            wrap_block(block, p)
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                setattr(model, head, p.linear(getattr(model, head), "tensor"))

    def units(self, model: nn.Module) -> list[Unit]:
        def embed_tokens(x):
            return model.norm_pre(model.patch_drop(model._pos_embed(x)))

        units = [Unit("patch_embed", model.patch_embed, post=embed_tokens)]
        units += [Unit(name, block) for name, block in numbered_blocks(model)]
        units.append(Unit("head", Head(model), pre=model.norm))
        return units

    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        return [pair for name, block in numbered_blocks(model) for pair in block_pairs(name, block)]

    def check_rotation(self, model: nn.Module) -> None:
        _check_rotation(model)

    def rotate(self, model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return _rotate(model, generator)

    def from_transformers(self, keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor] | None:
        # Each model's own marker, in its embeddings or its first block.
        if keys.has("embeddings.distillation_token"):
            return _deit(keys, model, path)
        if keys.has("encoder.layer.0.norm1.weight"):
            return _dinov2(keys, model, path)
        if keys.has("encoder.layer.0.layernorm_before.weight"):
            return _vit(keys, model)
        if keys.has("encoder.layers.0.layer_norm1.weight") and _is_siglip(keys):
            return _siglip(keys, model, path)
        return None


def check_block(name: str, block: nn.Module) -> None:
    """The block must be timm's standard pre-norm ``Block`` with ``Attention``, norms that are
    LayerNorms or timm's RmsNorm (AIMv2), and an MLP of two Linears ``fc1`` and ``fc2`` (timm's Mlp
    or GluMlp) or timm's SwiGLU (``fc1_g``, ``fc1_x``, ``fc2``; AIMv2) without a sub-norm."""
    if type(block) is not Block or type(block.attn) is not Attention:
        raise IsvitError(
            f"{name} is a {type(block).__name__} with {type(block.attn).__name__}; isvit supports the "
            "standard pre-norm ViT block (timm Block with Attention)"
        )
    for norm in ("norm1", "norm2"):
        if not isinstance(getattr(block, norm), (nn.LayerNorm, RMSNorm, RmsNorm)):
            raise IsvitError(f"{name}.{norm} is a {type(getattr(block, norm)).__name__}; isvit needs LayerNorm "
                             "(or timm's RmsNorm) there")
    mlp = block.mlp
    if type(mlp) is SwiGLU:
        if not isinstance(mlp.norm, nn.Identity):
            raise IsvitError(f"{name}.mlp.norm is a {type(mlp.norm).__name__}; isvit supports a ViT block's SwiGLU "
                             "without a sub-norm")
    elif not all(isinstance(getattr(mlp, fc, None), nn.Linear) for fc in ("fc1", "fc2")):
        raise IsvitError(f"{name}.mlp is a {type(mlp).__name__}; isvit supports an MLP of two Linears "
                         "fc1 and fc2 (timm's Mlp or GluMlp) or timm's SwiGLU in a ViT block")


def foldable(norm: nn.Module) -> bool:
    """Whether the post-LayerNorm fold can write into ``norm``: a LayerNorm, or the RMSNorm of a
    rotated model (both have the per-channel ``weight`` and ``bias`` it needs). timm's RmsNorm
    (AIMv2) has no bias, so the Linear after it takes its input per tensor and is not folded."""
    return isinstance(norm, (nn.LayerNorm, RMSNorm))


def wrap_block(block: nn.Module, p: Placement) -> None:
    """A checked ``Block``'s attention as ``QuantAttention`` and its MLP's Linears quantized: qkv and
    fc1 post-LayerNorm where their norm is foldable (per tensor after timm's RmsNorm), proj and fc2
    per tensor; a SwiGLU's ``fc1_g`` and ``fc1_x`` become one ``fc1`` (``modules.QuantSwiGLU``)."""
    qk, av = p.matmuls()
    attn = block.attn
    qkv = p.linear(attn.qkv, "post_ln" if foldable(block.norm1) else "tensor")
    block.attn = QuantAttention(attn, qkv, p.linear(attn.proj, "tensor"), qk, av)
    mlp = block.mlp
    fc1_input = "post_ln" if foldable(block.norm2) else "tensor"
    fc2 = p.linear(mlp.fc2, "tensor")
    if isinstance(mlp, SwiGLU):
        block.mlp = QuantSwiGLU(mlp, p.linear(joined_linear(mlp.fc1_g, mlp.fc1_x), fc1_input), fc2)
    else:
        mlp.fc1, mlp.fc2 = p.linear(mlp.fc1, fc1_input), fc2


def block_pairs(name: str, block: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
    """A wrapped block's fold pairs: norm1 -> qkv and norm2 -> fc1, where the norm is foldable."""
    pairs = [(f"{name}.norm1", block.norm1, block.attn.qkv), (f"{name}.norm2", block.norm2, block.mlp.fc1)]
    return [pair for pair in pairs if foldable(pair[1])]


class QuantAttention(nn.Module):
    """Multi-head self-attention of timm's ``Attention`` (ViT, DeiT) with quantized products.

    ``qk`` quantizes both operands of ``q @ k^T`` per tensor; ``av`` quantizes the post-Softmax map
    (SULQ, log-sqrt2 or uniform) and ``v``. ``qkv`` and ``proj`` are ``QuantLinear``.
    """

    def __init__(self, attn: nn.Module, qkv: QuantLinear, proj: QuantLinear, qk: QuantMatMul, av: QuantMatMul):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated attention is not supported by isvit yet")
        self.num_heads = attn.num_heads
        self.head_dim = getattr(attn, "head_dim", attn.qkv.out_features // 3 // attn.num_heads)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = attn.scale
        self.qkv, self.proj = qkv, proj
        self.q_norm = getattr(attn, "q_norm", nn.Identity())
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.norm = getattr(attn, "norm", nn.Identity())
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.qk, self.av = qk, av

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.qk(q * self.scale, k.transpose(-2, -1))
        bias = additive_mask(attn_mask, is_causal, N, attn)
        if bias is not None:
            attn = attn + bias
            if attn_mask is not None:
                v = v * attended_keys(bias)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.av(attn, v)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))


def attended_keys(bias: torch.Tensor) -> torch.Tensor:
    """1 for each key some query may attend to, 0 for a key the additive ``bias`` masks for every
    query (padding, NaFlexVit's patch_valid): shaped (..., keys, 1), a factor for v's rows.

    Softmax gives a masked key the weight 0, but the post-Softmax quantizer's lowest level need
    not be 0 (SULQ's is the smallest calibrated probability), so the quantized map would still give
    padding a little weight; zeroing padding's v keeps it out (exactly where v's grid holds 0, as
    it does unless all of v's calibration values had one sign), so the output does not depend on
    the padding."""
    masked = torch.finfo(bias.dtype).min / 2
    return (bias.amax(dim=-2) > masked).to(bias.dtype).unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------

@dataclass
class Embedding:
    """What writes the stream before the first block, where a ViT and a NaFlexVit name it differently:
    the patch projection (Linear or Conv2d), the module whose ``norm`` normalises its output
    (``patch_embed``; NaFlexVit's ``embeds``), the prefix tokens and position embeddings (channels
    last) that are added after that norm, and the stream's width."""

    proj: nn.Module
    norm_owner: nn.Module
    tokens: list[nn.Parameter]
    dim: int


def _vit_embedding(model) -> Embedding:
    tokens = [getattr(model, n, None) for n in ("cls_token", "dist_token", "reg_token", "pos_embed")]
    return Embedding(proj=model.patch_embed.proj, norm_owner=model.patch_embed,
                     tokens=[t for t in tokens if isinstance(t, nn.Parameter)], dim=model.embed_dim)


def _norm_kind(model) -> type[nn.Module]:
    """The kind of every norm that reads or writes the stream: LayerNorm, or timm's RmsNorm (AIMv2),
    as the first block's norm1 is. An RmsNorm does not subtract the mean, so its stream needs no
    centring: ``RmsNorm(x Q) = RmsNorm(x) Q`` once its gamma is in the Linears it feeds."""
    return RmsNorm if isinstance(model.blocks[0].norm1, RmsNorm) else nn.LayerNorm


def _require_norm(norm: nn.Module, where: str, kind: type[nn.Module], or_none: bool = False) -> None:
    if isinstance(norm, kind) or (or_none and isinstance(norm, nn.Identity)):
        return
    raise IsvitError(f"{where} is a {type(norm).__name__}; rotation needs a {kind.__name__}"
                     f"{' (or none)' if or_none else ''} there")


def _stream_start(model, embedding: Embedding) -> tuple[nn.Module, str] | None:
    """The norm whose output is the residual stream itself, if there is one, as (owner, attribute):
    ``norm_pre`` (CLIP: it normalises the embeddings' sum), else the patch embedding's norm (before
    the class token and position embedding are added; AIMv2's RmsNorm); None where the embeddings
    write the stream."""
    if not isinstance(model.norm_pre, nn.Identity):
        return model, "norm_pre"
    if not isinstance(getattr(embedding.norm_owner, "norm", None), (type(None), nn.Identity)):
        return embedding.norm_owner, "norm"
    return None


def _is_feature_tower(model) -> bool:
    """No classifier (``num_classes=0``): no Linear ``head`` or ``head_dist`` reads the pooled tokens."""
    return not any(isinstance(getattr(model, h, None), nn.Linear) for h in ("head", "head_dist"))


def head_readers(model) -> tuple[str | None, list[nn.Linear]]:
    """What reads the stream after the last block: (the attribute of the norm it goes through
    first, or None where there is none; the Linears that read that norm's output, or the stream).

    A feature tower has none: (``"norm"`` or None, []); its rotation is undone after ``norm``
    (module docstring), so what pools and normalises after it is not checked.

    With an attention-pool head (``global_pool='map'``) that is ``norm`` then the pool's ``kv``
    (its latent query, ``q``, ``proj``, norm and MLP never see the stream); with the class token or
    average pooling, ``norm`` (every token) or ``fc_norm`` (after pooling) then ``head`` and
    ``head_dist``. Raises ``IsvitError`` for a head rotation cannot carry (it must not change the
    model's output, so one Linear at least must read the rotated stream). The EVA adapter's rotation
    reads its head the same way (``read_head``)."""
    kind = _norm_kind(model)
    if _is_feature_tower(model):
        _require_norm(model.norm, "norm", kind, or_none=True)
        return ("norm" if isinstance(model.norm, kind) else None), []
    pool = getattr(model, "attn_pool", None)
    norms = ("norm",) if pool is not None else ("norm", "fc_norm")  # fc_norm after a pool reads the pool's output
    for name in norms:
        if getattr(model, name, None) is not None:
            _require_norm(getattr(model, name), name, kind, or_none=True)
    found = [n for n in norms if isinstance(getattr(model, n, None), kind)]
    if len(found) > 1:
        raise IsvitError(f"rotation needs one {kind.__name__} at most (norm or fc_norm) between the last block and the head")
    if pool is not None:
        if not isinstance(pool, AttentionPoolLatent):
            raise IsvitError(f"the model pools with {type(pool).__name__} (global_pool={model.global_pool!r}), "
                             "whose attention over groups of channels does not commute with a rotation")
        if pool.pos_embed is not None:
            raise IsvitError("the attention pool adds a position embedding after the final norm, which rotation cannot carry")
        return (found[0] if found else None), [pool.kv]
    if model.global_pool not in ("token", "avg", ""):
        raise IsvitError(f"rotation needs the class token, average or attention pooling before the head, not {model.global_pool!r}")
    heads = [h for h in (model.head, getattr(model, "head_dist", None)) if isinstance(h, nn.Linear)]
    return (found[0] if found else None), heads


def mlp_readers(mlp: nn.Module) -> list[nn.Linear]:
    """The MLP's Linears that read the stream (through norm2): fc1, or a SwiGLU's fc1_g and fc1_x."""
    return [mlp.fc1_g, mlp.fc1_x] if isinstance(mlp, SwiGLU) else [mlp.fc1]


def check_rotation(model, embedding: Embedding) -> None:
    """Everything ``rotate_stream`` cannot carry, as a one-sentence ``IsvitError``; changes nothing."""
    kind = _norm_kind(model)
    for name, block in numbered_blocks(model):
        check_block(name, block)
        _require_norm(block.norm1, f"{name}.norm1", kind)
        _require_norm(block.norm2, f"{name}.norm2", kind)
        for ls in (block.ls1, block.ls2):
            if not isinstance(ls, nn.Identity) and not isinstance(getattr(ls, "gamma", None), nn.Parameter):
                raise IsvitError(f"{name} has a {type(ls).__name__}; rotation folds LayerScale (a gamma per channel) only")
    _require_norm(model.norm_pre, "norm_pre", kind, or_none=True)
    embed_norm = getattr(embedding.norm_owner, "norm", None)  # before the stream where norm_pre is a norm
    if isinstance(model.norm_pre, nn.Identity) and embed_norm is not None:
        owner = next(n for n, m in model.named_modules() if m is embedding.norm_owner)
        _require_norm(embed_norm, f"{owner}.norm", kind, or_none=True)
    head_readers(model)


def _check_rotation(model) -> None:
    check_rotation(model, _vit_embedding(model))


def rotate_stream(model, embedding: Embedding, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The recipe of the module docstring, in place (``check_rotation`` has passed)."""
    blocks = [block for _, block in numbered_blocks(model)]
    q = orthogonal_like(embedding.dim, generator, embedding.proj.weight)
    head_norm, readers = head_readers(model)
    # LayerNorms: the stream is centred (the LayerNorms become RMSNorms) where every reader reads
    # it through a LayerNorm; where one reads it raw (no final norm: final_norm=False, or fc_norm
    # after an attention pool; a feature tower without norm, whose features are the stream), the
    # stream's mean matters and every LayerNorm becomes a RotatedLayerNorm instead, as in Swin.
    # RmsNorms: never centred (an RmsNorm keeps the mean), each becomes an RMSNorm.
    rms = _norm_kind(model) is RmsNorm
    centre = head_norm is not None and not rms
    as_rms = centre or rms  # what ``read`` calls centred: the norm it puts in is an RMSNorm
    for block in blocks:
        fold_layer_scale(block.ls1, block.attn.proj)
        fold_layer_scale(block.ls2, block.mlp.fc2)
    # 1 + 3: the writers, centred (LayerNorms only) and rotated
    start = _stream_start(model, embedding)
    if start is not None:  # a norm's output is the stream: its affine becomes a writer
        owner, attribute = start
        setattr(owner, attribute, norm_as_writer(getattr(owner, attribute), q, centre))
    if start is None or start[1] != "norm_pre":  # else the embeddings are normalised by norm_pre, outside the stream
        for token in embedding.tokens:
            write(token, q, -1, center=centre)
    if start is None:
        write_linear(embedding.proj, q, center=centre)
    for block in blocks:
        write_linear(block.attn.proj, q, center=centre)
        write_linear(block.mlp.fc2, q, center=centre)
    # 2 + 3: the readers, each norm swapped for an RMSNorm (a RotatedLayerNorm if not centred)
    for block in blocks:
        block.norm1 = read(block.norm1, [block.attn.qkv], q, centred=as_rms)
        block.norm2 = read(block.norm2, mlp_readers(block.mlp), q, centred=as_rms)
    read_head(model, head_norm, readers, q, centred=as_rms)
    for block in blocks:
        rotate_heads(block.attn, generator)
    return {"stream": q}


def read_head(model, head_norm: str | None, readers: list[nn.Linear], q: torch.Tensor, centred: bool) -> None:
    """The readers after the last block (``head_readers``) rewritten for the stream rotated by ``q``."""
    if not readers:  # a feature tower: the rotation undone right after norm (module docstring)
        model.norm = unrotate(model.norm, q, centred=centred)
    elif head_norm is not None:
        setattr(model, head_norm, read(getattr(model, head_norm), readers, q, centred=True))
    else:  # the head (or the attention pool's kv) reads the stream itself
        for linear in readers:
            linear.weight.copy_(linear.weight @ q)


def _rotate(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return rotate_stream(model, _vit_embedding(model), generator)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers checkpoints
# ---------------------------------------------------------------------------------------------

def _embeddings(keys: Renaming, model: nn.Module) -> None:
    """Patch embedding, class token and position embeddings (transformers adds the latter to the
    class token and the patches alike, as timm's ViTs do)."""
    p = keys.prefix
    keys.move_layer(f"{p}embeddings.patch_embeddings.projection", "patch_embed.proj")
    cls, pos = keys.take(f"{p}embeddings.cls_token"), keys.take(f"{p}embeddings.position_embeddings")
    if cls is not None and pos is not None and getattr(model, "no_embed_class", False):
        # timm's DINOv2-with-registers ViTs add position embeddings to the patches only: the class
        # token's own is added to the token once here (timm's converter of the original DINOv2 does the same).
        cls, pos = cls + pos[:, :1], pos[:, 1:]
    for tensor, name in ((cls, "cls_token"), (pos, "pos_embed")):
        if tensor is not None:
            keys.out[name] = tensor
    # The token that masked image modelling puts in place of hidden patches: never used by a classifier.
    keys.drop(f"{p}embeddings.mask_token")


def _encoder_block(keys: Renaming, src: str, dst: str) -> None:
    """One transformer block, ``{p}encoder.layer.{i}.`` -> ``blocks.{i}.``. ViT and DeiT name their
    parts after BERT (layernorm_before, intermediate, output), DINOv2 after its own code (norm1, mlp,
    layer_scale): a checkpoint has one set or the other, so moving both names covers either."""
    keys.move_layer(src + "layernorm_before", dst + "norm1")  # ViT, DeiT
    keys.move_layer(src + "norm1", dst + "norm1")  # DINOv2
    attention = src + "attention.attention."
    keys.fuse_qkv(attention + "query", attention + "key", attention + "value", dst + "attn.qkv")
    keys.move_layer(src + "attention.output.dense", dst + "attn.proj")
    # DINOv2's LayerScale: a per-channel factor on each residual branch, timm's ls1 / ls2.
    keys.move(src + "layer_scale1.lambda1", dst + "ls1.gamma")
    keys.move_layer(src + "layernorm_after", dst + "norm2")  # ViT, DeiT
    keys.move_layer(src + "norm2", dst + "norm2")  # DINOv2
    keys.move_layer(src + "intermediate.dense", dst + "mlp.fc1")  # ViT, DeiT
    keys.move_layer(src + "output.dense", dst + "mlp.fc2")
    keys.move_layer(src + "mlp.fc1", dst + "mlp.fc1")  # DINOv2 (GELU MLP)
    keys.move_layer(src + "mlp.fc2", dst + "mlp.fc2")
    # DINOv2 giant's SwiGLU MLP: weights_in packs gate and value rows as timm's SwiGLUPacked fc1 does
    # (silu(first half) * second half in both).
    keys.move_layer(src + "mlp.weights_in", dst + "mlp.fc1")
    keys.move_layer(src + "mlp.weights_out", dst + "mlp.fc2")
    keys.move(src + "layer_scale2.lambda1", dst + "ls2.gamma")


def _encoder(keys: Renaming) -> None:
    """All blocks, then the final LayerNorm."""
    p = keys.prefix
    for i in keys.numbers(rf"{re.escape(p)}encoder\.layer\.(\d+)\."):
        _encoder_block(keys, f"{p}encoder.layer.{i}.", f"blocks.{i}.")
    keys.move_layer(f"{p}layernorm", "norm")
    # ViTModel's and DeiTModel's pooler (tanh of a Linear on the class token) has no place in timm,
    # whose features are the normed class token itself; the ForImageClassification models do not
    # use it either (their classifier reads the normed class token), so it is left out.
    keys.drop(f"{p}pooler.dense.weight")
    keys.drop(f"{p}pooler.dense.bias")


def _vit(keys: Renaming, model: nn.Module) -> dict[str, torch.Tensor]:
    """ViTModel / ViTForImageClassification: the classifier reads the normed class token, as timm's
    ``head`` does (global_pool='token')."""
    _embeddings(keys, model)
    _encoder(keys)
    keys.move_layer("classifier", "head")
    return keys.result()


def _deit(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """DeiT: a ViT whose sequence is class token, distillation token, patches, as in timm's
    VisionTransformerDistilled (position embeddings for all of them)."""
    if getattr(model, "dist_token", None) is None:
        raise IsvitError(
            f"weights file {path} holds a Hugging Face DeiT, which has a distillation token: name one of timm's "
            f"distilled DeiTs (such as deit_base_distilled_patch16_224), not {type(model).__name__} without one"
        )
    _embeddings(keys, model)
    keys.move(f"{keys.prefix}embeddings.distillation_token", "dist_token")
    _encoder(keys)
    if "cls_classifier.weight" in keys.left:
        # DeiTForImageClassificationWithTeacher: logits = (cls_classifier(class token) +
        # distillation_classifier(distillation token)) / 2, timm's (head + head_dist) / 2 in eval mode.
        keys.move_layer("cls_classifier", "head")
        keys.move_layer("distillation_classifier", "head_dist")
    elif "classifier.weight" in keys.left and isinstance(getattr(model, "head_dist", None), nn.Linear):
        # DeiTForImageClassification: logits = classifier(class token) alone. timm's distilled model
        # averages its two heads, so head gets twice the classifier and head_dist zeros:
        # (2 W c + 2 b + 0) / 2 = W c + b, exactly (doubling and halving are exact in floating point).
        weight, bias = keys.take("classifier.weight"), keys.take("classifier.bias")
        keys.out["head.weight"], keys.out["head_dist.weight"] = 2 * weight, torch.zeros_like(weight)
        if bias is not None:
            keys.out["head.bias"], keys.out["head_dist.bias"] = 2 * bias, torch.zeros_like(bias)
    return keys.result()


def _dinov2(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """Dinov2Model / Dinov2WithRegistersModel: LayerScale blocks; register tokens follow the class
    token in both (timm's ``reg_token``)."""
    if "classifier.weight" in keys.left:
        # Dinov2ForImageClassification classifies [class token, mean of the patch tokens]
        # concatenated: no timm head pools that way.
        raise IsvitError(
            f"weights file {path} holds a Hugging Face Dinov2ForImageClassification, whose classifier reads the "
            f"class token and the mean patch token side by side, which no timm head computes: isvit converts "
            f"its backbone only, saved on its own (model.dinov2.save_pretrained) and named as a timm DINOv2 "
            f"such as vit_small_patch14_dinov2"
        )
    _embeddings(keys, model)
    keys.move(f"{keys.prefix}embeddings.register_tokens", "reg_token")
    _encoder(keys)
    return keys.result()


def _is_siglip(keys: Renaming) -> bool:
    """SigLIP's layout (``encoder.layers.{i}.layer_norm1``, as CLIP's) without CLIP's class token,
    and with a Conv2d patch embedding (SigLIP 2's NaFlex model has a Linear one)."""
    patch = keys.left.get(f"{keys.prefix}embeddings.patch_embedding.weight")
    return patch is not None and patch.dim() == 4 and not keys.has("embeddings.class_embedding")


def _siglip(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """SiglipVisionModel -> timm's SigLIP VisionTransformer: patches alone (no class token), a
    learned position embedding per patch, pre-norm blocks, ``post_layernorm`` as timm's ``norm``
    and the attention-pool head (``head``: a latent query attending over the tokens, then a
    LayerNorm and MLP with a residual) as timm's ``attn_pool``.

    transformers' head is a ``nn.MultiheadAttention``: its ``in_proj`` stacks the q, k and v rows;
    timm's pool has ``q`` (the latent's) and ``kv`` (k rows then v rows), so the rows split at the
    width. ``SiglipForImageClassification`` classifies the mean of the normed tokens (its head is
    computed but unused): timm's average pooling without fc_norm then ``head``."""
    p = keys.prefix
    keys.move_layer(f"{p}embeddings.patch_embedding", "patch_embed.proj")
    pos = keys.take(f"{p}embeddings.position_embedding.weight")
    if pos is not None:
        keys.out["pos_embed"] = pos.unsqueeze(0)
    return siglip_tower(keys, model, path)


def siglip_tower(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """What follows SigLIP's embeddings, the same in SigLIP 2's NaFlex model (``families/naflexvit.py``
    uses it): the blocks, ``post_layernorm``, the attention-pool head or a classifier (``_siglip``)."""
    p = keys.prefix
    keys.drop(f"{p}embeddings.position_ids")  # a buffer older releases saved
    for i in keys.numbers(rf"{re.escape(p)}encoder\.layers\.(\d+)\."):
        src, dst = f"{p}encoder.layers.{i}.", f"blocks.{i}."
        keys.move_layer(src + "layer_norm1", dst + "norm1")
        attention = src + "self_attn."
        keys.fuse_qkv(attention + "q_proj", attention + "k_proj", attention + "v_proj", dst + "attn.qkv")
        keys.move_layer(attention + "out_proj", dst + "attn.proj")
        keys.move_layer(src + "layer_norm2", dst + "norm2")
        keys.move_layer(src + "mlp.fc1", dst + "mlp.fc1")
        keys.move_layer(src + "mlp.fc2", dst + "mlp.fc2")
    keys.move_layer(f"{p}post_layernorm", "norm")
    head = f"{p}head."
    if "classifier.weight" in keys.left:
        pools_the_mean = (getattr(model, "global_pool", None) == "avg"
                          and isinstance(getattr(model, "norm", None), nn.LayerNorm)
                          and isinstance(getattr(model, "fc_norm", None), nn.Identity))
        if not pools_the_mean:
            raise IsvitError(f"weights file {path} holds a Hugging Face SiglipForImageClassification, which "
                             "classifies the mean of the normed tokens: build the timm SigLIP with "
                             "global_pool='avg' and fc_norm=False")
        keys.move_layer("classifier", "head")
        for key in [k for k in keys.left if k.startswith(head)]:
            keys.drop(key)
    keys.move(head + "probe", "attn_pool.latent")
    for part in ("weight", "bias"):
        rows = keys.take(f"{head}attention.in_proj_{part}")
        if rows is not None:
            width = rows.shape[0] // 3
            keys.out[f"attn_pool.q.{part}"], keys.out[f"attn_pool.kv.{part}"] = rows[:width], rows[width:]
    keys.move_layer(head + "attention.out_proj", "attn_pool.proj")
    keys.move_layer(head + "layernorm", "attn_pool.norm")
    keys.move_layer(head + "mlp.fc1", "attn_pool.mlp.fc1")
    keys.move_layer(head + "mlp.fc2", "attn_pool.mlp.fc2")
    if p:  # a SiglipModel's text tower and its similarity's scale and bias: no part of the image features
        for key in [k for k in keys.left if k.startswith("text_model.") or k in ("logit_scale", "logit_bias")]:
            keys.drop(key)
    return keys.result()
