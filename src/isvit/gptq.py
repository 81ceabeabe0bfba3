"""GPTQ rounding of quantized weights (Frantar et al., 2022, arXiv 2210.17323).

Round-to-nearest puts every weight on its grid independently. GPTQ rounds a layer's input columns
one at a time and spreads each column's rounding error over the columns not yet rounded, weighted
by the layer's input statistics H = X^T X, so that the layer's *output* on the calibration inputs
moves as little as possible. The grid itself (the weight quantizer's per-channel scale and zero
point) is not changed: GPTQ only chooses which code each weight gets.

With ``IsvitConfig(gptq=True)`` (``--gptq``) isvit uses it as the starting point of stage 3: a
unit's weights are rounded by GPTQ on the unit's quantized inputs, then block reconstruction trains
them further. It is off by default: it lowers the weights' error before training, but after the
fast preset's training it did not help on held-out calibration images (docs/methods.md,
docs/results.md#held-out-tuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import reduce_
from .modules import QuantConv2d, QuantLinear
from .quantizers import UniformQuantizer, fake_quant_uniform


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    levels: int,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, in) ``weight`` put on the grid ``(code - zero_point[o]) * scale[o]`` by GPTQ.

    ``hessian`` is X^T X (in, in) of the layer's inputs (any positive multiple). Columns are taken
    in order of decreasing ``hessian`` diagonal (the most used inputs first); ``damp`` times the mean
    diagonal is added for a stable inverse. Returns ``(rounded, latent)`` like ``weight``:
    ``rounded`` lies on the grid; ``latent`` holds each column as it was just before it was rounded
    (the original plus the compensation it received), which rounds to ``rounded`` but keeps where
    each weight sits inside its rounding interval (what block reconstruction trains from).
    """
    W = weight.detach().to(torch.float64).clone()
    n = W.shape[1]
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: nothing to compensate with
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype, device=H.device)
    order = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, order], H[order][:, order]
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to columns > i.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s = scale.detach().reshape(-1, 1).to(torch.float64)
    z = zero_point.detach().reshape(-1, 1).to(torch.float64)
    Q = torch.empty_like(W)
    latent = torch.empty_like(W)
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block = W[:, start:end].clone()
        errors = torch.empty_like(block)
        for j in range(end - start):
            column = block[:, j:j + 1]
            rounded = fake_quant_uniform(column, s, z, levels)
            Q[:, start + j:start + j + 1] = rounded
            latent[:, start + j:start + j + 1] = column
            error = (column - rounded) / U[start + j, start + j]
            block[:, j:] -= error * U[start + j:start + j + 1, start + j:end]
            errors[:, j:j + 1] = error
        W[:, end:] -= errors @ U[start:end, end:]
    # Compensation can push a column past the grid's ends; there it rounds to the end code, and
    # is put at that end so that the straight-through gradient is not cut off.
    latent = torch.minimum(torch.maximum(latent, -z * s), (levels - 1 - z) * s)
    back = torch.argsort(order)
    return Q[:, back].to(weight.dtype), latent[:, back].to(weight.dtype)


def _gptq_layers(unit: nn.Module) -> list[nn.Module]:
    """The unit's layers whose weights are quantized (enabled, calibrated, uniform grid), in
    registration order, which is forward order for timm's blocks."""
    return [
        m for m in unit.modules()
        if isinstance(m, (QuantLinear, QuantConv2d))
        and isinstance(m.weight_quantizer, UniformQuantizer)
        and m.weight_quantizer.enabled
        and m.weight_quantizer.is_calibrated
        and (m.groups == 1 if isinstance(m, QuantConv2d) else True)
    ]


def _as_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's weight multiplies, as (rows, in_features) rows: the quantized input of a
    Linear, the unfolded patches of a Conv2d."""
    if isinstance(layer, QuantLinear):
        x = layer.input_quantizer(x)
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@torch.no_grad()
def gptq_unit(unit: nn.Module, inputs: torch.Tensor, device, batch_size: int = 64, damp: float = 0.01) -> int:
    """Round every quantized weight of ``unit`` by GPTQ, layer after layer in forward order.

    Each layer's H comes from running the unit (as quantized so far, with its activation
    quantizers on) over ``inputs``, so a layer compensates the rounding of the layers before it.
    Each latent weight becomes GPTQ's compensated value (it rounds to GPTQ's choice; training
    goes on from there). Returns the number of layers rounded.
    """
    layers = _gptq_layers(unit)
    for layer in layers:
        weight = layer.weight.reshape(layer.weight.shape[0], -1)
        hessian = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=device)

        def accumulate(module, args, hessian=hessian):
            rows = _as_rows(module, args[0]).to(torch.float64)
            hessian.addmm_(rows.T, rows)

        handle = layer.register_forward_pre_hook(accumulate)
        try:
            for i in range(0, inputs.shape[0], batch_size):
                unit(inputs[i:i + batch_size].to(device, torch.float32))
        finally:
            handle.remove()
        reduce_([hessian])  # process group: every rank's inputs (its shard of them) in one H
        q = layer.weight_quantizer
        _, latent = gptq_round(weight, hessian, q.scale, q.zero_point, q.levels, damp=damp)
        layer.weight.data.copy_(latent.reshape(layer.weight.shape))
    return len(layers)
