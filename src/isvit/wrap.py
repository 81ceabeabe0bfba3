"""Model surgery: where each quantizer goes, done by the model's family (``isvit.families``).

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

Supported: the families registered in ``isvit.families`` (timm ``VisionTransformer``,
``SwinTransformer``, ``SwinTransformerV2``, ``Beit`` and ``Eva``); each family's file says what it
quantizes differently from the above (its sub-LayerNorms, its post-norm blocks ...) and what it
refuses. Anything else is refused with a clear error, before any module is swapped, rather than
quantized half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import families
from .errors import IsvitError
from .families import family_of
from .families.base import Unit
from .modules import QuantLinear, QuantMatMul
from .quantizers import ACTIVATION_PERCENTILES, WEIGHT_PERCENTILES, Quantizer, UniformQuantizer, make_softmax_quantizer

__all__ = ["Placement", "Unit", "architecture", "check_supported", "forward_units", "is_block",
           "post_layernorm_pairs", "wrap_model"]


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
    """The name of the model's family (``Family.name``: 'vit', 'swin' ...); a clear error for
    anything isvit cannot wrap."""
    return family_of(model).name


def check_supported(model: nn.Module) -> str:
    """``architecture(model)`` of a model not yet wrapped, after checking what its family's surgery
    needs: everything a one-sentence ``IsvitError`` refuses is found here, before any module is
    swapped and before any calibration work."""
    if any(isinstance(m, Quantizer) for m in model.modules()):
        raise IsvitError("the model is already quantized")
    family = family_of(model)
    family.check(model)
    return family.name


def wrap_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Swap quantized modules into ``model`` in place and return it."""
    check_supported(model)  # all of the family's checks, before any module is swapped
    family_of(model).wrap(model, placement)
    return model


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` (a unit's body) is a transformer block of a supported family."""
    return any(isinstance(module, family.block_types) for family in families.FAMILIES)


def post_layernorm_pairs(model: nn.Module) -> list[tuple[str, nn.Module, QuantLinear]]:
    """(name, LayerNorm (or the RMSNorm of a rotated model), the Linear it alone feeds) for every
    reparameterisable pair of a wrapped model, as its family finds them: each block's norm1 -> qkv
    and norm2 -> fc1, and the sub-LayerNorms where a family has them."""
    return family_of(model).post_layernorm_pairs(model)


def forward_units(model: nn.Module) -> list[Unit]:
    """The model's forward pass cut into reconstruction units, in order: patch embedding, every
    transformer block (and Swin's patch merging as a single layer), the head."""
    return family_of(model).units(model)
