"""The model families isvit quantizes: one adapter per family (``base.Family``), one file each,
registered in ``FAMILIES`` below.

A model belongs to the first family whose ``matches`` accepts it (``family_of``); ``wrap.py``,
``rotate.py`` and ``hf.py`` ask that family for everything that differs between families, so a new
family is a new file here and one entry in ``FAMILIES`` (docs/usage.md, "Adding a model family").
"""

from __future__ import annotations

from torch import nn

from ..errors import IsvitError
from .base import Family, Unit
from .beit import BEiT
from .eva import EVA
from .hiera import Hiera
from .hieradet import HieraDet
from .naflexvit import NaFlex
from .swin import Swin
from .swinv2 import SwinV2
from .vit import ViT

__all__ = ["FAMILIES", "Family", "Unit", "family_of", "listing", "register_family"]

# The registry: every family isvit supports, in the order a model is matched against them; a family
# whose timm classes the installed timm lacks (HieraDet before timm 1.0.9, NaFlexVit before 1.0.16) is left out.
FAMILIES: list[Family] = [
    f for f in (ViT(), Swin(), SwinV2(), BEiT(), EVA(), NaFlex(), Hiera(), HieraDet()) if f.model_types
]


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (after the built-in ones) and return it."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a model family named {family.name!r} is already registered")
    FAMILIES.append(family)
    return family


def family_of(model: nn.Module) -> Family:
    """The registered family of ``model``; a one-sentence ``IsvitError`` for a model of none."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise IsvitError(f"isvit supports timm {listing([f.description for f in FAMILIES], 'and')} models, "
                     f"not {type(model).__name__}")


def listing(names: list[str], conjunction: str) -> str:
    """'A', 'A and B', 'A, B and C' (or with 'or')."""
    if len(names) <= 1:
        return "".join(names)
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"
