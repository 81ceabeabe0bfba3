"""Block-wise reconstruction: train one unit (a transformer block, the patch embedding, the head)
at a time so that its quantized output matches the full-precision model's.

For a unit u with quantized copy u^, full-precision input X and quantized-model input X^:

    minimise  E_batch  sum_features (u^(X_in) - u(X))^2   over u^'s weights and biases
              (and, with ``learn_scales``, its quantizers' scales)

with X_in = X (stage 1: inputs from the full-precision model) or X_in = X^ (stage 3: sequential,
inputs from the quantized model so far). Adam with cosine decay to 0, batches drawn at random
from the calibration set. Rounding passes gradients straight through.

The calibration set's activations at the current unit are cached whole (on ``cache_device``, in
``cache_dtype``): only the current unit's inputs and targets are held, never all units'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import Shard, local_part, sum_gradients
from .quantizers import Quantizer, UniformQuantizer, named_quantizers
from .wrap import Unit


@dataclass(frozen=True)
class ReconstructionSettings:
    iters: int
    batch_size: int = 64
    lr: float = 4e-5
    scale_lr: float = 1e-4
    learn_scales: bool = False
    cache_dtype: torch.dtype = torch.float32
    cache_device: torch.device | None = None  # default: where the model runs
    seed: int = 0
    check_size: int = 256  # calibration images on which a unit's loss is compared before/after
    micro_batch: int = 32  # a batch is run in chunks of this many images, gradients accumulated
    loss: str = "mse"  # or "token": each token's squared error relative to its target's variance
    drop_prob: float = 0.0  # QDrop: while training, activations keep their float value with this probability


LOSSES = ("mse", "token")


def token_errors(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token reconstruction error: the squared error summed over the features ("mse", the
    paper's), or that divided by the target token's variance over its features ("token"): the error
    as the next LayerNorm, which normalises every token, sees it. ViT's residual stream carries a
    few tokens whose values are 100x the others'; under plain MSE their errors drown the rest."""
    err = (out - target).pow(2).sum(dim=-1)
    if loss == "token":
        err = err / target.var(dim=-1, unbiased=False).clamp_min(1e-6)
    return err


def unit_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The float parameters the reconstruction trains: every weight and bias in the unit."""
    return [p for p in unit.parameters() if p.dtype.is_floating_point]


def scale_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """Make the scales of the unit's enabled, calibrated uniform quantizers learnable; returns them.

    A grid with outlier channels of their own (two scales over many channels) keeps its scales:
    learnt one per channel they would drift apart into a per-channel grid that no per-tensor
    integer product takes.
    """
    return [
        q.learnable_scale()
        for q in unit.modules()
        if isinstance(q, UniformQuantizer) and q.enabled and q.is_calibrated
        and not (q.outlier_ratio > 0 and q.is_per_channel)
    ]


def freeze_scales(unit: nn.Module) -> None:
    for q in unit.modules():
        if isinstance(q, UniformQuantizer):
            q.freeze_scale()


@torch.no_grad()
def run_unit(unit: nn.Module, x: torch.Tensor, device, batch_size: int, out_dtype, out_device) -> torch.Tensor:
    """``unit`` applied to all of ``x`` in batches (no gradient)."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(unit(x[i:i + batch_size].to(device, torch.float32)).to(out_device, out_dtype))
    return torch.cat(outs)


def reconstruct_unit(
    unit: Unit,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: ReconstructionSettings,
    device,
    *,
    progress: bool = True,
    desc: str = "",
    shard: Shard | None = None,
) -> list[float]:
    """Train ``unit`` (in place) so that unit(inputs) matches targets; returns the loss per step.

    ``shard``: in a process group, ``inputs`` and ``targets`` are this rank's shard of all
    ``shard.total`` items. Every rank draws the same batch of indices into all of them, trains on
    the part of it that it holds, and the gradients are summed over the ranks before each step: the
    update of one process taking the whole batch, identical on every rank.
    """
    params = unit_parameters(unit)
    groups = [{"params": params, "lr": settings.lr}]
    if settings.learn_scales:
        scales = scale_parameters(unit)
        if scales:
            groups.append({"params": scales, "lr": settings.scale_lr})
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.iters, eta_min=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    n = inputs.shape[0] if shard is None else shard.total
    losses = []
    # Dropout/drop-path off: reconstruction matches the eval-mode function. Each module's own mode
    # is put back afterwards (the Unit wrapper is a fresh module, always in training mode).
    modes = [(m, m.training) for m in unit.modules()]
    unit.train(False)
    dropping = [q for _, q in named_quantizers(unit, "activation")]
    for q in dropping:
        q.drop_prob = settings.drop_prob
    bar = tqdm(range(settings.iters), desc=desc, disable=not progress, leave=False)
    try:
        for _ in bar:
            idx = torch.randint(n, (min(settings.batch_size, n),), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            # The same gradient as one pass over the batch, in chunks: on CPU two passes of 32
            # images are faster than one of 64 (the attention maps stay in cache).
            for chunk in local_part(idx, shard).split(settings.micro_batch):
                x = inputs[chunk].to(device, torch.float32)
                y = targets[chunk].to(device, torch.float32)
                with torch.enable_grad():
                    part = token_errors(unit(x), y, settings.loss).mean() * (len(chunk) / len(idx))
                    part.backward()
                loss += part.item()
            loss = sum_gradients(optimizer, loss)  # process group: gradients and loss summed over the ranks
            optimizer.step()
            schedule.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4g}")
    finally:
        for module, mode in modes:
            module.training = mode
        for q in dropping:
            q.drop_prob = 0.0
        if settings.learn_scales:
            freeze_scales(unit)
    return losses


@torch.no_grad()
def reconstruction_loss(
    unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device, batch_size: int = 64, loss: str = "mse"
) -> float:
    """The reconstruction objective of ``unit`` over the whole set (for reports and tests)."""
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        out = unit(inputs[i:i + batch_size].to(device, torch.float32))
        y = targets[i:i + batch_size].to(device, torch.float32)
        total += token_errors(out, y, loss).sum().item()
        count += math.prod(y.shape[:-1])
    return total / count


def has_enabled_quantizer(unit: nn.Module) -> bool:
    return any(isinstance(m, Quantizer) and m.enabled for m in unit.modules())
