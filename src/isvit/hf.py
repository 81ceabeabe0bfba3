"""Hugging Face ``transformers`` checkpoints renamed to the keys of the timm model the user names.

A checkpoint written by ``save_pretrained`` (``model.safetensors``, or ``pytorch_model.bin`` from
older releases) holds the same tensors as timm's model under other names, with q, k and v as three
Linears where timm has one fused ``qkv``. ``to_timm`` renames (and fuses) them; ``models.load_weights``
then loads the result strictly, as it loads a timm state dict. Each family's renamer is in its file
under ``isvit/families/`` (``Family.from_transformers``): ViT, DeiT and DINOv2 in ``vit.py``, Swin in
``swin.py``.

Only the tensors are read, never the checkpoint's config.json: what leaves no trace in the weights
comes from the timm model (activation, image size, LayerNorm eps).

isvit does not import transformers: the renamers use the names of its saved files (the same for
4.x and 5.x releases; 5.x renames modules in memory but saves the old names).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from . import families
from .errors import IsvitError
from .families import listing

# A base model saved on its own (``ViTModel``, ``Dinov2Model`` ...) has no prefix: its keys begin
# ``embeddings.`` / ``encoder.``. The task models' keys carry the backbone's attribute as a prefix
# (``ViTForImageClassification.vit``: ``Family.transformers_prefixes``), the heads' none.
BASE_MODEL_PARTS = ("embeddings.", "encoder.")


def backbone_prefixes() -> tuple[str, ...]:
    """The backbone prefixes of every registered family's task models ("vit.", "swin." ...)."""
    return tuple(prefix for family in families.FAMILIES for prefix in family.transformers_prefixes)


def is_transformers(state: dict[str, torch.Tensor]) -> bool:
    """Whether the keys are those of a transformers vision model (a backbone prefix, or a bare base
    model's ``embeddings.`` / ``encoder.``)."""
    return any(key.startswith(backbone_prefixes() + BASE_MODEL_PARTS) for key in state)


def to_timm(state: dict[str, torch.Tensor], model: nn.Module, path) -> dict[str, torch.Tensor]:
    """The checkpoint under ``model``'s timm names; tensors it cannot place keep their transformers
    names, so that the strict load that follows names them as unexpected. A checkpoint of another
    family, or one that the timm model cannot express, is refused with an ``IsvitError``."""
    prefix = next((p for p in backbone_prefixes() if any(k.startswith(p) for k in state)), "")
    keys = Renaming(state, prefix)
    # Each family recognises its checkpoints by their own keys (markers in the first block or the embeddings).
    for family in families.FAMILIES:
        renamed = family.from_transformers(keys, model, path)
        if renamed is not None:
            return renamed
    sample = ", ".join(sorted(state)[:3])
    names = listing([name for family in families.FAMILIES for name in family.transformers_names], "or")
    raise IsvitError(
        f"weights file {path} looks like a Hugging Face transformers checkpoint but not of a {names} model, "
        f"the ones isvit can convert (its keys include {sample})"
    )


class Renaming:
    """The checkpoint's tensors, moved one by one to their timm names (``out``); what is never moved
    stays under its transformers name (``left``). A tensor the checkpoint lacks is skipped: the strict
    load then reports the timm key it would have filled as missing."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self.left = dict(state)
        self.prefix = prefix  # of the backbone's keys; heads have none
        self.out: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        """Whether the backbone has ``name``."""
        return self.prefix + name in self.left

    def take(self, key: str) -> torch.Tensor | None:
        return self.left.pop(key, None)

    def move(self, key: str, to: str) -> None:
        if key in self.left:
            self.out[to] = self.left.pop(key)

    def move_layer(self, key: str, to: str) -> None:
        """A Linear's, LayerNorm's or Conv's weight and bias."""
        for part in ("weight", "bias"):
            self.move(f"{key}.{part}", f"{to}.{part}")

    def fuse_qkv(self, q: str, k: str, v: str, to: str) -> None:
        """Three Linears into timm's fused ``qkv``: their output rows stacked as q, k, v."""
        for part in ("weight", "bias"):
            names = [f"{name}.{part}" for name in (q, k, v)]
            if all(name in self.left for name in names):
                self.out[f"{to}.{part}"] = torch.cat([self.left.pop(name) for name in names])

    def drop(self, key: str) -> None:
        self.left.pop(key, None)

    def numbers(self, pattern: str) -> list[int]:
        """The numbers that the regex ``pattern``'s group captures in the keys left (block indices)."""
        found = (re.match(pattern, key) for key in self.left)
        return sorted({int(m.group(1)) for m in found if m})

    def result(self) -> dict[str, torch.Tensor]:
        return {**self.left, **self.out}
