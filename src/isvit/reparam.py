"""Per-channel to per-tensor reparameterisation of post-LayerNorm quantizers (RepQ-ViT, SOS stage 2).

With the per-channel scale d and zero point z of the quantizer in front of a Linear fed by a
LayerNorm, pick a per-tensor scale d' = mean(d) and an integer zero point z' = round(mean(z)), and
let r = d / d' and b = (z' - z) d'  (= -(z d) / r + z' d'). Then

    LayerNorm:  gamma' = gamma / r,   beta' = beta / r - b      (its output becomes x / r - b)
    Linear:     W' = W * r (input columns),   bias' = bias + W' b

leaves the full-precision function unchanged, and, because x'/d' + z' = x/d + z channel by
channel, every integer code of the activation is unchanged too: with z and z' integers the
quantized function is unchanged as well (only the weights W' must be re-quantized).
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import QuantLinear
from .quantizers import UniformQuantizer


@torch.no_grad()
def reparameterize_layernorm(norm: nn.LayerNorm, linear: QuantLinear) -> None:
    """Fold ``linear.input_quantizer``'s per-channel grid into ``norm`` and ``linear``, in place.

    Afterwards the input quantizer is per tensor with (d', z'); the weight quantizer is left as it
    was and must be re-calibrated on the new weights.
    """
    quantizer = linear.input_quantizer
    if not isinstance(quantizer, UniformQuantizer) or not quantizer.is_per_channel:
        raise ValueError("reparameterisation needs a calibrated per-channel uniform input quantizer")
    d, z = quantizer.scale, quantizer.zero_point
    d_new = d.mean()
    z_new = torch.round(z.mean())
    r = d / d_new
    b = (z_new - z) * d_new

    norm.weight.copy_(norm.weight / r)
    norm.bias.copy_(norm.bias / r - b)
    linear.weight.copy_(linear.weight * r)
    linear.bias.add_(linear.weight @ b)  # QuantLinear always has a bias
    quantizer.set_params(d_new, z_new)
