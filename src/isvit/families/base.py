"""The adapter interface every model family implements, and the pieces several families share.

A family's adapter (``Family``) owns everything isvit does differently for that family: which timm
models it takes, what it checks before any module is swapped, the module surgery, the
reconstruction units, the post-LayerNorm pairs of the fold, its rotation (or why there is none)
and its Hugging Face key renamer. The generic machinery (``wrap.Placement``, ``Unit``,
``rotate.rotate_model``, ``hf.to_timm``) asks the family of a model (``families.family_of``) and
never tests a family name itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from ..errors import IsvitError
from ..modules import QuantConv2d, QuantLinear, QuantSwiGLU, RMSNorm

if TYPE_CHECKING:
    from ..hf import Renaming
    from ..wrap import Placement


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


class Family(ABC):
    """One model family's adapter: subclass it in a file of its own under ``isvit/families/`` and
    add an instance to ``FAMILIES`` in ``families/__init__.py``.

    ``check`` finds everything the family's surgery cannot carry, so that ``wrap`` never refuses
    half-way: a model that passes ``check`` is wrapped whole; one that does not is left unchanged.
    """

    name: str  # what ``wrap.architecture`` returns, e.g. "vit"
    description: str  # how the error for an unsupported model lists the family, e.g. "SwinTransformer"
    model_types: tuple[type, ...]  # the timm model classes of the family (matched with isinstance)
    block_types: tuple[type, ...]  # the bodies of its units that are transformer blocks

    # Rotation (rotate.py): a family that rotates names itself in ``rotation_name`` ("ViT/DeiT",
    # in the sentence refusing the others) and overrides ``check_rotation`` and ``rotate``; one
    # that does not leaves it None and says why in ``no_rotation``.
    rotation_name: str | None = None
    no_rotation: str = ""

    # Hugging Face transformers checkpoints (hf.py): the backbone's key prefixes in the task models
    # ("vit."), the model names the refusal lists ("ViT") and ``from_transformers``; none by default.
    transformers_prefixes: tuple[str, ...] = ()
    transformers_names: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_types)

    @abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise a one-sentence ``IsvitError`` for anything ``wrap`` cannot carry; change nothing."""

    @abstractmethod
    def wrap(self, model: nn.Module, placement: Placement) -> None:
        """Swap the quantized modules into ``model`` in place (``check`` has passed)."""

    @abstractmethod
    def units(self, model: nn.Module) -> list[Unit]:
        """The forward pass cut into reconstruction units, in order (``wrap.forward_units``)."""

    @abstractmethod
    def post_layernorm_pairs(self, model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
        """(name, LayerNorm, the Linear it alone feeds) of a wrapped model (``wrap.post_layernorm_pairs``)."""

    def check_rotation(self, model: nn.Module) -> None:
        """Raise a one-sentence ``IsvitError`` for anything ``rotate`` cannot carry; change nothing."""
        raise NotImplementedError

    def rotate(self, model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Rotate the float64 model in place (``rotate.rotate_model``); returns the stream's rotations."""
        raise NotImplementedError

    def from_transformers(self, keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor] | None:
        """The checkpoint under ``model``'s timm names, or None where it is not of this family."""
        return None

    def config_args(self, config: dict, model: nn.Module, where: str) -> dict:
        """The timm keyword arguments, beyond the ones every family shares (``hf.config_model_args``:
        image size, activation, LayerNorm eps), with which ``model`` (built with timm's defaults)
        becomes what a transformers ``config`` describes; only what differs. A value no argument
        expresses is refused in one sentence naming ``where`` (the config file). None by default."""
        return {}


# ---------------------------------------------------------------------------------------------
# Pieces several families share
# ---------------------------------------------------------------------------------------------

def numbered_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.blocks`` with their names, ``blocks.{i}`` (ViT, BEiT, EVA)."""
    return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def staged_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every stage's blocks with their names, ``layers.{i}.blocks.{j}`` (Swin, Swin V2)."""
    return [
        (f"layers.{i}.blocks.{j}", block)
        for i, stage in enumerate(model.layers)
        for j, block in enumerate(stage.blocks)
    ]


def staged_units(model: nn.Module, head: Head) -> list[Unit]:
    """Swin's and Swin V2's units: the patch embedding, every stage's patch merging (a single layer)
    and blocks, the head."""
    units = [Unit("patch_embed", model.patch_embed)]
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            units.append(Unit(f"layers.{i}.downsample", stage.downsample))
        units += [Unit(f"layers.{i}.blocks.{j}", block) for j, block in enumerate(stage.blocks)]
    units.append(Unit("head", head, pre=model.norm))
    return units


class Head(nn.Module):
    """``model.forward_head`` as a module whose parameters are the head's (pooling, fc_norm, head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(
            m for m in (getattr(model, n, None) for n in ("fc_norm", "head", "head_dist")) if isinstance(m, nn.Module)
        )
        self._forward_head = model.forward_head

    def forward(self, x):
        return self._forward_head(x)


def check_layernorm(norm: nn.Module, where: str) -> None:
    """A LayerNorm, or the RMSNorm (or RotatedLayerNorm) that took its place in a rotated model
    (rotate.py): both have the per-channel ``weight`` and ``bias`` the post-LayerNorm fold writes into."""
    if not isinstance(norm, (nn.LayerNorm, RMSNorm)):
        raise IsvitError(f"{where} is a {type(norm).__name__}; isvit needs LayerNorm there")


def single_bias_qkv(attn: nn.Module) -> nn.Linear:
    """``attn.qkv`` with BEiT's / EVA's / Swin V2's separate ``q_bias``, zero ``k_bias`` and
    ``v_bias`` as its own bias: the same ``F.linear(x, W, cat(q_bias, k_bias, v_bias))`` timm computes."""
    qkv = attn.qkv
    if qkv is None:  # EVA with qkv_fused=False: q_proj, k_proj (no bias), v_proj
        return joined_linear(attn.q_proj, attn.k_proj, attn.v_proj)
    if getattr(attn, "q_bias", None) is None:
        return qkv
    linear = nn.Linear(qkv.in_features, qkv.out_features, bias=False, device=qkv.weight.device, dtype=qkv.weight.dtype)
    linear.weight = qkv.weight
    linear.bias = nn.Parameter(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach().clone())
    return linear


def joined_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing ``cat([linear(x) for linear in linears], -1)``."""
    w = linears[0].weight
    linear = nn.Linear(w.shape[1], sum(lin.out_features for lin in linears), bias=False, device=w.device, dtype=w.dtype)
    linear.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]).detach().clone())
    biases = [lin.bias if lin.bias is not None else torch.zeros(lin.out_features, device=w.device, dtype=w.dtype)
              for lin in linears]
    linear.bias = nn.Parameter(torch.cat(biases).detach().clone())
    return linear


def after_norm(norm: nn.Module) -> str:
    """The input granularity of a Linear that reads ``norm``'s output: 'post_ln' after a LayerNorm."""
    return "post_ln" if isinstance(norm, nn.LayerNorm) else "tensor"


def check_mlp(name: str, mlp: nn.Module) -> None:
    """timm's Mlp, GluMlp or SwiGLU with an optional sub-LayerNorm ``norm`` (BEiT, EVA)."""
    if type(mlp) not in (Mlp, GluMlp, SwiGLU) or not isinstance(getattr(mlp, "fc2", None), nn.Linear):
        raise IsvitError(f"{name}.mlp is a {type(mlp).__name__}; isvit supports timm's Mlp, GluMlp and SwiGLU there")
    if not isinstance(mlp.norm, (nn.LayerNorm, nn.Identity)):
        raise IsvitError(f"{name}.mlp.norm is a {type(mlp.norm).__name__}; isvit needs LayerNorm (or none) there")


def wrap_mlp(block: nn.Module, p: Placement) -> None:
    """``block.mlp``'s Linears quantized: fc1 after norm2, fc2 after the MLP's own norm (if any);
    a SwiGLU's ``fc1_g`` and ``fc1_x`` become one ``fc1`` (modules.QuantSwiGLU)."""
    mlp = block.mlp
    fc2 = p.linear(mlp.fc2, after_norm(mlp.norm))
    if isinstance(mlp, SwiGLU):
        block.mlp = QuantSwiGLU(mlp, p.linear(joined_linear(mlp.fc1_g, mlp.fc1_x), "post_ln"), fc2)
    else:
        mlp.fc1, mlp.fc2 = p.linear(mlp.fc1, "post_ln"), fc2


def inner_norm_pairs(name: str, block: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
    """A wrapped BEiT or EVA block's sub-LayerNorms and the Linear after each (attn.norm -> proj,
    mlp.norm -> fc2), where they are LayerNorms."""
    pairs = []
    for where, norm, linear in ((f"{name}.attn.norm", getattr(block.attn, "norm", None), block.attn.proj),
                                (f"{name}.mlp.norm", block.mlp.norm, block.mlp.fc2)):
        if isinstance(norm, nn.LayerNorm):
            pairs.append((where, norm, linear))
    return pairs


def wrap_token_blocks(model: nn.Module, p: Placement, attention: type[nn.Module]) -> None:
    """BEiT's and EVA's surgery: the patch embedding, every block's attention as ``attention``
    (qkv with the separate q / v biases as its one bias, proj after the attention's sub-LayerNorm
    if any) and MLP (``wrap_mlp``), and the head."""
    model.patch_embed.proj = QuantConv2d(model.patch_embed.proj, p.weight())
    for _, block in numbered_blocks(model):
        qk, av = p.matmuls()
        attn = block.attn
        qkv = p.linear(single_bias_qkv(attn), "post_ln")
        proj = p.linear(attn.proj, after_norm(getattr(attn, "norm", None)))
        block.attn = attention(attn, qkv, proj, qk, av)
        wrap_mlp(block, p)
    if isinstance(model.head, nn.Linear):
        model.head = p.linear(model.head, "tensor")


def token_block_pairs(model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
    """A wrapped BEiT's or EVA's fold pairs: each block's norm1 -> qkv, norm2 -> fc1 and its
    sub-LayerNorms (``inner_norm_pairs``)."""
    pairs = []
    for name, block in numbered_blocks(model):
        pairs.append((f"{name}.norm1", block.norm1, block.attn.qkv))
        pairs.append((f"{name}.norm2", block.norm2, block.mlp.fc1))
        pairs += inner_norm_pairs(name, block)
    return pairs
