"""Rotation of the residual stream and of every attention head (``rotate=True`` in every method's config).

An exact rewrite of a full-precision model, done offline before it is wrapped: the quantizers then
see rotated activations and weights, in which a few outlier channels are spread over all channels.
Nothing is added to the forward pass (no online Hadamard transform): every rotation is in the
weights, so inference costs what it did (hence fc2's input, behind a GELU, is not rotated). The
two exceptions, each one float d x d product a token: a LayerNorm whose output is the stream itself
(``orthogonal.norm_as_writer``), and the output of a feature tower (``num_classes=0``), where no
Linear reads the stream and the rotation is undone after the final norm (``orthogonal.unrotate``).

``rotate_model`` checks what is generic (not quantized, not rotated, one dtype), then hands the
model to its family (``isvit.families``): the family checks what its recipe cannot carry (before
any weight changes) and rotates; a family without rotation says why. The recipes are in
``families/vit.py`` (zero-mean stream, LayerNorms become RMSNorms) and ``families/swin.py`` (a
rotation per stage, LayerNorms become RotatedLayerNorms); the math they share is in
``orthogonal.py``. The model is rewritten in float64 and cast back once at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from . import families
from .errors import IsvitError
from .families import family_of, listing
from .modules import RMSNorm, RotatedLayerNorm
from .orthogonal import hadamard, random_orthogonal, rotate_heads
from .quantizers import Quantizer

__all__ = ["RMSNorm", "RotatedLayerNorm", "hadamard", "is_rotated", "random_orthogonal", "rotate_heads", "rotate_model"]


def is_rotated(model: nn.Module) -> bool:
    """Whether ``rotate_model`` rotated ``model``: its LayerNorms are RMSNorms (or RotatedLayerNorms).
    What a saved or exported model records, rather than what its config asked for: the fast
    preset's rotation is skipped, with a warning, for a model that cannot be rotated."""
    return any(isinstance(m, RMSNorm) for m in model.modules())


def rotate_model(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rotate a full-precision model of a family that rotates (ViT/DeiT, Swin) in place, before it
    is wrapped: same function (up to float rounding), rotated residual stream and attention heads.

    Returns the stream's rotations (float64), by where they start: ``{"stream": Q}`` for a ViT,
    ``{"layers.i": Q_i}`` for each Swin stage from the second on. ``seed`` seeds every rotation.
    """
    family = family_of(model)
    if family.rotation_name is None:
        rotating = listing([f.rotation_name for f in families.FAMILIES if f.rotation_name is not None], "and")
        raise IsvitError(f"rotation supports {rotating} models, not {type(model).__name__} ({family.no_rotation})")
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise IsvitError("the model is already quantized: rotate it before quantizing it")
    if is_rotated(model):
        raise IsvitError("the model is already rotated")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        raise IsvitError(f"rotation needs one dtype for all parameters, the model has {sorted(map(str, dtypes))}")
    family.check_rotation(model)
    generator = torch.Generator().manual_seed(seed)
    dtype = dtypes.pop()
    model.to(torch.float64)
    try:
        with torch.no_grad():
            return family.rotate(model, generator)
    finally:
        model.to(dtype)
