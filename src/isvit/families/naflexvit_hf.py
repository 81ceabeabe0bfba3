"""Hugging Face transformers' SigLIP 2 NaFlex vision tower (``Siglip2VisionModel``) -> timm's
``NaFlexVit`` (naflexvit_base_patch16_siglip ...): the renamer for the NaFlexVit adapter's
``from_transformers`` (to be moved into its family file; this module registers no family).

transformers' NaFlex model embeds patches that its image processor has already cut out, each
flattened as (row, column, channel), with a Linear; timm's NaFlexVit does the same
(``embeds.proj``, its ``batch_patchify`` in the same order), so the weight moves as it is. The
learned position embedding is a square grid of ``num_patches`` in both (transformers keeps it as
``num_patches`` rows, timm as ``(1, H, W, C)``), resized to each image's grid of patches by
bilinear interpolation with antialiasing in both: at the grid's own size neither resizes and the
two compute the same; at another size they interpolate the same way (measured in tests/test_hf.py).
The rest (blocks, final norm, attention-pool head) is SigLIP's (``vit.siglip_tower``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import IsvitError
from .vit import siglip_tower

if TYPE_CHECKING:
    from ..hf import Renaming

# The backbone's prefix in transformers' task models (Siglip2Model, Siglip2ForImageClassification)
# and in 4.x's saved Siglip2VisionModel, as for SigLIP.
TRANSFORMERS_PREFIXES = ("vision_model.",)
TRANSFORMERS_NAMES = ("SigLIP 2 NaFlex",)


def is_siglip2_naflex(keys: Renaming) -> bool:
    """SigLIP's layout (``encoder.layers.{i}.layer_norm1``) with a Linear patch embedding."""
    patch = keys.left.get(f"{keys.prefix}embeddings.patch_embedding.weight")
    return keys.has("encoder.layers.0.layer_norm1.weight") and patch is not None and patch.dim() == 2


def from_transformers(keys: Renaming, model: nn.Module, path) -> dict[str, torch.Tensor] | None:
    """The checkpoint under the NaFlexVit's timm names, or None where it is not SigLIP 2 NaFlex's."""
    if not is_siglip2_naflex(keys):
        return None
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
