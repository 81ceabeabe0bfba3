"""timm's ``Eva``: EVA-02, DINOv3, the RoPE ViTs (axial, with an absolute position embedding, or
mixed) and the Perception Encoder: pre-norm blocks with a rotary position embedding.

``qkv`` takes the separate ``q_bias`` / zero ``k_bias`` / ``v_bias`` as its one bias (separate
``q_proj`` / ``k_proj`` / ``v_proj`` become one ``qkv``); a SwiGLU MLP's ``fc1_g`` and ``fc1_x``
become one ``fc1`` (``modules.QuantSwiGLU``); a sub-LayerNorm (``attn.norm``, ``mlp.norm``) makes
the Linear after it a post-LayerNorm one, folded like ``qkv`` and ``fc1``. Both of timm's attentions
are carried by ``QuantEvaAttention``: ``EvaAttention`` (EVA-02, DINOv3) and ``timm.layers``'
``AttentionRope`` (RoPE ViT, Perception Encoder; grouped-query attention with fewer k/v heads too).
The rotary embedding, the q/k norms and LayerScale stay floating point; prefix tokens (class,
DINOv3's storage/register tokens) get no rotary embedding, as in timm.

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

Rotation (``rotate.rotate_model``; the math in ``orthogonal.py``), as the ViT adapter's
(``families/vit.py``): LayerScale folded into ``attn.proj`` and ``mlp.fc2``; the stream made
zero-mean and rotated by one Q, its writers (patch embedding, class/storage tokens, absolute
position embedding, or ``norm_pre``'s affine as a float Linear where it is a LayerNorm; each
block's ``attn.proj`` and ``mlp.fc2``) and readers (``qkv`` or ``q/k/v_proj``, ``fc1`` or SwiGLU's
``fc1_g``/``fc1_x``; the head, the attention pool's ``kv``) rewritten, each LayerNorm on the stream
an RMSNorm (a RotatedLayerNorm where the head reads the stream without a final norm, the
Perception Encoder's spatial tower); a feature tower undoes the rotation after ``norm``. Exact with
the rotary embedding, which acts on q and k after ``qkv``, whose values the stream rotation does not
change. Per head, v and ``proj`` are rotated but not q and k: the rotary embedding turns pairs of
q's and k's channels by angles that depend on the position, and a rotation of a head's channels
commutes with those 2x2 rotations only if it is itself made of 2x2 rotations of the same pairs.
EVA's fused ``qkv`` ignores its own bias for the separate ``q_bias``/``k_bias``/``v_bias``, so the
LayerNorm's shift folded into qkv goes there (the k part into ``k_bias``, a zero buffer until
then, which timm does not save: the wrapped model's qkv holds all three in its saved bias).
Refused for rotation: max pooling before the head, a norm other than LayerNorm on the stream.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import timm.layers
import torch
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from ..errors import IsvitError
from ..modules import QuantLinear, QuantMatMul, additive_mask
from ..orthogonal import (
    fold_gamma,
    norm_as_writer,
    orthogonal_like,
    read,
    require_layernorm,
    rotate_values,
    write,
    write_linear,
)
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
from .vit import head_readers, mlp_readers, read_head

if TYPE_CHECKING:
    from ..hf import Renaming
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
    rotation_name = "Eva"
    # Hugging Face transformers: DINOv3ViTModel (renamer at the end of this file). It has no task
    # model; "model." is where transformers 5.x keeps its blocks in memory (saved as "layer.").
    transformers_prefixes = ("model.",)
    transformers_names = ("DINOv3",)

    def from_transformers(self, keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor] | None:
        return _dinov3(keys, model, path) if keys.has("layer.0.layer_scale1.lambda1") else None

    def config_args(self, config: dict, model: nn.Module, where: str) -> dict:
        # DINOv3's rotary embedding: transformers' rope_theta is timm's rope_temperature
        theta = config.get("rope_theta")
        if theta is None or getattr(model, "rope", None) is None:
            return {}
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise IsvitError(f"{where} has rope_theta {theta!r}, not a positive number")
        return {} if float(theta) == getattr(model.rope, "temperature", None) else {"rope_temperature": float(theta)}

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

    def check_rotation(self, model: nn.Module) -> None:
        self.check(model)
        _check_rotation(model)

    def rotate(self, model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return _rotate(model, generator)


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------

def _attention_readers(attn: nn.Module) -> list[nn.Linear]:
    """The Linears that read norm1's output: the fused ``qkv``, or ``q_proj``, ``k_proj`` and ``v_proj``."""
    return [attn.qkv] if attn.qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]


def _check_rotation(model: nn.Module) -> None:
    for name, block in numbered_blocks(model):
        require_layernorm(block.norm1, f"{name}.norm1")
        require_layernorm(block.norm2, f"{name}.norm2")
    if not isinstance(model.norm_pre, (nn.Identity, nn.LayerNorm)):
        raise IsvitError(f"norm_pre is a {type(model.norm_pre).__name__}; rotation needs a LayerNorm (or none) there")
    if not isinstance(getattr(model.patch_embed, "norm", None), (type(None), nn.Identity)):
        raise IsvitError("the patch embedding has a norm of its own, which rotation does not carry for EVA")
    head_readers(model)


def _read_attention_input(block: nn.Module, q: torch.Tensor, centred: bool) -> None:
    """norm1 swapped for the norm ``read`` makes, its affine in qkv. EvaAttention's fused qkv with
    separate biases ignores ``qkv.bias``: what ``read`` put there moves into ``q_bias``, ``k_bias``
    (a buffer, zero until now: a k bias moves the keys, which the rotary embedding turns, so it
    counts) and ``v_bias``; the wrapped model's qkv takes all three as its one bias, saved."""
    attn = block.attn
    block.norm1 = read(block.norm1, _attention_readers(attn), q, centred=centred)
    if attn.qkv is not None and getattr(attn, "q_bias", None) is not None:
        b_q, b_k, b_v = attn.qkv.bias.chunk(3)
        attn.q_bias.add_(b_q)
        attn.k_bias.add_(b_k)
        attn.v_bias.add_(b_v)
        attn.qkv.bias = None


def _rotate_values(attn: nn.Module, generator: torch.Generator) -> None:
    """Each k/v head's v and the columns of ``proj`` that read it turned by a random orthogonal
    ``S_h`` (``orthogonal.rotate_values``); q and k are not rotated: the rotary embedding turns pairs
    of their channels by position-dependent angles, which a rotation of the head's channels does not
    commute with. Skipped where the attention output is normalised (``attn.norm``)."""
    if not isinstance(attn.norm, nn.Identity):
        return
    heads, head_dim = attn.num_heads, attn.proj.in_features // attn.num_heads
    kv_heads = getattr(attn, "num_kv_heads", heads)
    if attn.qkv is not None:
        weight = attn.qkv.weight[2 * heads * head_dim:]
        bias = attn.v_bias if getattr(attn, "q_bias", None) is not None else attn.qkv.bias
        bias = bias[-kv_heads * head_dim:] if bias is not None else None
    else:
        weight, bias = attn.v_proj.weight, attn.v_proj.bias
    rotate_values(weight, bias, attn.proj, kv_heads, generator)


def _rotate(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    blocks = [block for _, block in numbered_blocks(model)]
    q = orthogonal_like(model.embed_dim, generator, model.patch_embed.proj.weight)
    head_norm, readers = head_readers(model)
    # Centred (RMSNorm) where every reader reads the stream through a LayerNorm; where one reads
    # it raw (no final norm: the Perception Encoder's spatial tower), the stream's mean matters and
    # every LayerNorm becomes a RotatedLayerNorm instead.
    centre = head_norm is not None
    for block in blocks:
        fold_gamma(block.gamma_1, block.attn.proj)
        fold_gamma(block.gamma_2, block.mlp.fc2)
    # 1 + 3: the writers, centred and rotated
    if isinstance(model.norm_pre, nn.LayerNorm):  # its output is the stream: its affine becomes a writer
        model.norm_pre = norm_as_writer(model.norm_pre, q, centre)
    else:
        for name in ("cls_token", "reg_token", "pos_embed"):
            if isinstance(getattr(model, name, None), nn.Parameter):
                write(getattr(model, name), q, -1, center=centre)
        write_linear(model.patch_embed.proj, q, center=centre)
    for block in blocks:
        write_linear(block.attn.proj, q, center=centre)
        write_linear(block.mlp.fc2, q, center=centre)
    # 2 + 3: the readers, each LayerNorm swapped for an RMSNorm (a RotatedLayerNorm if not centred)
    for block in blocks:
        _read_attention_input(block, q, centre)
        block.norm2 = read(block.norm2, mlp_readers(block.mlp), q, centred=centre)
    read_head(model, head_norm, readers, q, centred=centre)
    for block in blocks:
        _rotate_values(block.attn, generator)
    return {"stream": q}


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


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers checkpoints
# ---------------------------------------------------------------------------------------------

def _dinov3(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """DINOv3ViTModel (or DINOv3ViTBackbone, the same tensors) -> timm's DINOv3 Evas
    (vit_small_patch16_dinov3 ...): class token, register tokens, patches; a rotary embedding on the
    patches, computed from the image size alone (nothing saved: transformers' ``inv_freq`` is a
    buffer it does not save, timm's is recomputed too); LayerScale in every block; a final norm.

    q, k and v become timm's ``qkv``; q's and v's biases its ``q_bias`` and ``v_bias`` (timm's k
    bias is fixed at zero, as DINOv3's key_bias=False has it). A timm model without q/v biases
    (the DINOv3s without ``_qkvb``) takes a checkpoint whose biases are all zero, as Meta's distilled
    ones are. Gated MLPs (``use_gated_mlp``: act(gate) * up) become timm's SwiGLU (``fc1_g``,
    ``fc1_x``) or its packed GluMlp (``fc1`` = gate rows then up rows)."""
    blocks = keys.prefix + "layer."  # the saved "layer.{i}.", or 5.x's in-memory "model.layer.{i}."
    expected = model.state_dict()
    keys.move("embeddings.cls_token", "cls_token")
    registers = keys.take("embeddings.register_tokens")
    if registers is not None and registers.shape[1] > 0:
        keys.out["reg_token"] = registers
    keys.move_layer("embeddings.patch_embeddings", "patch_embed.proj")
    keys.drop("embeddings.mask_token")  # masked image modelling's token: never used by the features
    keys.drop("rope_embeddings.inv_freq")
    for i in keys.numbers(rf"{re.escape(blocks)}(\d+)\."):
        src, dst = f"{blocks}{i}.", f"blocks.{i}."
        keys.move_layer(src + "norm1", dst + "norm1")
        _dinov3_attention(keys, src + "attention.", dst + "attn.", expected, path)
        keys.move_layer(src + "attention.o_proj", dst + "attn.proj")
        keys.move(src + "layer_scale1.lambda1", dst + "gamma_1")
        keys.move_layer(src + "norm2", dst + "norm2")
        _dinov3_mlp(keys, src + "mlp.", dst + "mlp.", expected)
        keys.move(src + "layer_scale2.lambda1", dst + "gamma_2")
    keys.move_layer("norm", "norm")
    return keys.result()


def _dinov3_mlp(keys: Renaming, src: str, dst: str, expected: dict) -> None:
    """up_proj, down_proj -> ``fc1``, ``fc2``; a gated MLP's gate_proj -> SwiGLU's ``fc1_g`` (up_proj
    its ``fc1_x``), or both into a packed GluMlp's ``fc1``, gate rows first (timm's gate_last=False)."""
    gate, up = src + "gate_proj", src + "up_proj"
    if f"{gate}.weight" in keys.left and f"{dst}fc1_g.weight" in expected:
        keys.move_layer(gate, dst + "fc1_g")
        keys.move_layer(up, dst + "fc1_x")
    elif f"{gate}.weight" in keys.left:
        for part in ("weight", "bias"):
            if f"{gate}.{part}" in keys.left and f"{up}.{part}" in keys.left:
                keys.out[f"{dst}fc1.{part}"] = torch.cat([keys.take(f"{gate}.{part}"), keys.take(f"{up}.{part}")])
    else:
        keys.move_layer(up, dst + "fc1")
    keys.move_layer(src + "down_proj", dst + "fc2")


def _dinov3_attention(keys: Renaming, src: str, dst: str, expected: dict, path) -> None:
    """q_proj, k_proj, v_proj -> ``qkv`` with ``q_bias`` / ``v_bias`` (or timm's separate
    ``q_proj`` / ``k_proj`` / ``v_proj`` where the model has them, qkv_fused=False)."""
    if f"{dst}qkv.weight" not in expected:
        for name in ("q_proj", "k_proj", "v_proj"):
            keys.move_layer(src + name, dst + name)
        return
    weights = [f"{src}{name}.weight" for name in ("q_proj", "k_proj", "v_proj")]
    if all(w in keys.left for w in weights):
        keys.out[f"{dst}qkv.weight"] = torch.cat([keys.take(w) for w in weights])
    k_bias = keys.take(f"{src}k_proj.bias")
    if k_bias is not None and bool(k_bias.any()):
        raise IsvitError(f"weights file {path} holds a DINOv3 whose key projection has a bias (key_bias), "
                         "which timm's DINOv3 fixes at zero")
    q_bias, v_bias = keys.take(f"{src}q_proj.bias"), keys.take(f"{src}v_proj.bias")
    if f"{dst}q_bias" in expected:
        like = keys.out.get(f"{dst}qkv.weight", expected[f"{dst}q_bias"]).new_zeros(expected[f"{dst}q_bias"].shape)
        keys.out[f"{dst}q_bias"] = q_bias if q_bias is not None else like
        keys.out[f"{dst}v_bias"] = v_bias if v_bias is not None else like
    elif any(b is not None and bool(b.any()) for b in (q_bias, v_bias)):
        raise IsvitError(f"weights file {path} holds a DINOv3 with q and v biases, which the timm model has no "
                         "place for: name its _qkvb variant (such as vit_small_patch16_dinov3_qkvb)")
