"""Block-wise reconstruction: train one unit (a transformer block, the patch embedding, the head)
at a time so that its quantized output matches the full-precision model's.

For a unit u with quantized copy u^, full-precision input X and quantized-model input X^:

    minimise  E_batch  sum_features (u^(X_in) - u(X))^2   over u^'s weights and biases
              (and, with ``learn_scales``, its quantizers' scales)

with X_in = X (stage 1: inputs from the full-precision model) or X_in = X^ (stage 3: sequential,
inputs from the quantized model so far). Adam with cosine decay to 0, batches drawn at random
from the calibration set. What is trained:

- ``rounding="ste"`` (the paper's): the latent float weights and biases, through the rounding's
  straight-through estimator. Adam moves a weight by about ``lr`` a step, so in a short schedule
  few weights move by a whole grid step;
- ``rounding="adaround"`` (BRECQ / QDrop): each quantized weight's rounding direction, a variable
  per weight (``quantizers.UniformQuantizer.start_learnt_rounding``) with its own learning rate
  ``round_lr`` and a regulariser (weight ``round_reg``) annealed so that every weight ends rounded
  up or down; the float weights themselves stay; biases and the other float parameters train as
  with "ste". The unit ends with its weights exactly on their grid;
- ``rounding="offset"``: the same choice (each weight to its floor or the code above), learnt as an
  offset in [-1/2, 1/2] of a step added before rounding, through the straight-through estimator
  (SignRound-like): hard codes in every forward pass, no soft-to-hard gap, nothing to anneal;
- with ``learn_scales``, the step sizes of the activation quantizers too (LSQ, in the log domain,
  learning rate ``scale_lr``; with "ste" the weight quantizers' as well).

Losses (per token, then averaged): "mse" sums the squared error over the features (the paper's);
"token" divides it by the target token's variance (what the next LayerNorm sees); "fisher"
weights the "token" error of every (position, feature) by how much it moves the network's output:
the squared gradient of the full-precision model's log-likelihood with respect to the unit's output,
averaged over the calibration images (``output_importance``; the diagonal of the Fisher
information, the importance estimate of BRECQ/APHQ-ViT), normalised to mean 1.

The calibration set's activations at the current unit are cached whole (on ``cache_device``, in
``cache_dtype``): only the current unit's inputs and targets are held, never all units'.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Reconstruction
from .distributed import Shard, local_part, sum_gradients
from .quantizers import Quantizer, UniformQuantizer, named_quantizers
from .wrap import Unit


def token_errors(out: torch.Tensor, target: torch.Tensor, loss: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token reconstruction error: the squared error summed over the features ("mse", the
    paper's), or that divided by the target token's variance over its features ("token"): the error
    as the next LayerNorm, which normalises every token, sees it. ViT's residual stream carries a
    few tokens whose values are 100x the others'; under plain MSE their errors drown the rest.
    "fisher" is "token" with each (position, feature) weighted by ``importance`` (broadcast over
    the batch)."""
    sq = (out - target).pow(2)
    if loss == "fisher":
        if importance is None:
            raise ValueError("the fisher loss needs the unit's output importance")
        sq = sq * importance
    err = sq.sum(dim=-1)
    if loss in ("token", "fisher"):
        err = err / target.var(dim=-1, unbiased=False).clamp_min(1e-6)
    return err


def output_importance(units: list[nn.Module], images: torch.Tensor, device, batch_size: int, seed: int) -> list[torch.Tensor]:
    """For each unit of a full-precision model (run in order), the mean over ``images`` of the
    squared gradient of log p(y | x) with respect to the unit's output, y drawn from the model's own
    prediction (so no labels: the diagonal of the Fisher information, which is the Hessian of the
    KL divergence to the full-precision output at the full-precision point). Each gradient is
    multiplied by its token's variance first, which takes out the next LayerNorm's 1/std (the
    "token" loss divides by it), and each map is normalised to mean 1. Returns one map per unit,
    shaped like one image's unit output (positions x features)."""
    generator = torch.Generator().manual_seed(seed)
    sums: list[torch.Tensor | None] = [None] * len(units)
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, torch.float32)
        outputs = []
        with torch.enable_grad():
            for unit in units:
                x = unit(x)
                if not x.requires_grad:  # the first unit, with frozen parameters: start the graph here
                    x = x.detach().requires_grad_(True)
                outputs.append(x)
            log_p = x.log_softmax(dim=-1)
            y = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator).to(log_p.device)
            # gradients with respect to the unit outputs only: nothing accumulates in the parameters
            grads = torch.autograd.grad(log_p.gather(1, y).sum(), outputs)
        for i, (out, grad) in enumerate(zip(outputs, grads)):
            g2 = grad.pow(2) * out.detach().var(dim=-1, unbiased=False, keepdim=True)
            total = g2.sum(dim=0).double()
            sums[i] = total if sums[i] is None else sums[i] + total
    return [(s / s.mean().clamp_min(1e-30)).float() for s in sums]


def unit_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The float parameters the reconstruction trains: every weight and bias in the unit."""
    return [p for p in unit.parameters() if p.dtype.is_floating_point]


def scale_parameters(unit: nn.Module, weights: bool = True) -> list[nn.Parameter]:
    """Make the scales of the unit's enabled, calibrated uniform quantizers learnable (the weight
    quantizers' only with ``weights``); returns the parameters.

    A grid with outlier channels of their own (two scales over many channels) keeps its scales:
    learnt one per channel they would drift apart into a per-channel grid that no per-tensor
    integer product takes.
    """
    return [
        q.learnable_scale()
        for name, q in named_quantizers(unit, "all" if weights else "activation")
        if isinstance(q, UniformQuantizer) and q.enabled and q.is_calibrated
        and not (q.outlier_ratio > 0 and q.is_per_channel)
    ]


def rounded_layers(unit: nn.Module) -> list[nn.Module]:
    """The layers of ``unit`` whose weight quantizer is on and calibrated (what AdaRound rounds)."""
    return [
        m for m in unit.modules()
        if isinstance(getattr(m, "weight_quantizer", None), UniformQuantizer)
        and m.weight_quantizer.enabled and m.weight_quantizer.is_calibrated
    ]


@torch.no_grad()
def snap_to_grid(unit: nn.Module) -> None:
    """Put every weight of ``rounded_layers(unit)`` on its grid (round to nearest), as learnt
    rounding leaves the weights of the units it trained: a unit put back as it was before training
    then also ends on exact codes (its forward pass does not change: it rounded the same way)."""
    for m in rounded_layers(unit):
        m.weight.copy_(m.weight_quantizer(m.weight))


def rounding_beta(step: int, settings: Reconstruction) -> float | None:
    """The regulariser's exponent at ``step`` (None during the warm-up: no regulariser yet):
    linear from ``round_beta[0]`` after the warm-up to ``round_beta[1]`` at the last step."""
    warmup = settings.round_warmup * settings.iters
    if step < warmup:
        return None
    progress = (step - warmup) / max(1.0, settings.iters - 1 - warmup)
    start, end = settings.round_beta
    return start + (end - start) * min(1.0, progress)


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


def has_fast_bfloat16(device) -> bool:
    """Whether ``device`` multiplies bf16 matrices faster than float32 ones: a CUDA GPU with bf16
    support, or a CPU with AVX-512 BF16 or AMX (elsewhere oneDNN converts, which is slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def compute_dtype_on(device, compute_dtype: str) -> str:
    """The compute dtype a reconstruction on ``device`` runs in: "auto" is bfloat16 where the device
    has fast bf16 arithmetic (``has_fast_bfloat16``), float32 elsewhere."""
    if compute_dtype == "auto":
        return "bfloat16" if has_fast_bfloat16(device) else "float32"
    return compute_dtype


def autocast(device, compute_dtype: str):
    """torch.autocast on ``device``'s kind in ``compute_dtype`` (a no-op where that is float32)."""
    dtype = compute_dtype_on(device, compute_dtype)
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def reconstruct_unit(
    unit: Unit,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: Reconstruction,
    device,
    *,
    seed: int = 0,
    importance: torch.Tensor | None = None,
    progress: bool = True,
    desc: str = "",
    on_step: Callable[[int], None] | None = None,
    shard: Shard | None = None,
) -> list[float]:
    """Train ``unit`` (in place) so that unit(inputs) matches targets; returns the loss per step.
    ``seed``: of the batches drawn. ``importance``: the unit's output importance, for the "fisher"
    loss. ``on_step(i)`` is called after step i (0-based), e.g. to time the steps.

    ``shard``: in a process group, ``inputs`` and ``targets`` are this rank's shard of all
    ``shard.total`` items. Every rank draws the same batch of indices into all of them, trains on
    the part of it that it holds, and the gradients are summed over the ranks before each step: the
    update of one process taking the whole batch, identical on every rank.
    """
    rounded = rounded_layers(unit) if settings.rounding != "ste" else []
    fixed = {id(m.weight) for m in rounded}  # their rounding is learnt instead
    groups = [{"params": [p for p in unit_parameters(unit) if id(p) not in fixed], "lr": settings.lr}]
    roundings = [m.weight_quantizer.start_learnt_rounding(m.weight, settings.rounding) for m in rounded]
    if roundings:
        groups.append({"params": roundings, "lr": settings.round_lr})
    if settings.learn_scales:
        scales = scale_parameters(unit, weights=settings.rounding == "ste")
        if scales:
            groups.append({"params": scales, "lr": settings.scale_lr})
    groups = [g for g in groups if g["params"]]
    num_rounded = sum(r.numel() for r in roundings)
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.iters, eta_min=0.0)
    generator = torch.Generator().manual_seed(seed)
    n = inputs.shape[0] if shard is None else shard.total
    losses = []
    # Dropout/drop-path off: reconstruction matches the eval-mode function. Each module's own mode
    # is put back afterwards (the Unit wrapper is a fresh module, always in training mode).
    modes = [(m, m.training) for m in unit.modules()]
    unit.train(False)
    dropping = [q for _, q in named_quantizers(unit, "activation")]
    for q in dropping:
        q.qdrop = settings.qdrop
    bar = tqdm(range(settings.iters), desc=desc, disable=not progress, leave=False)
    try:
        for step in bar:
            idx = torch.randint(n, (min(settings.batch_size, n),), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            # The same gradient as one pass over the batch, in chunks: on CPU two passes of 32
            # images are faster than one of 64 (the attention maps stay in cache).
            for chunk in local_part(idx, shard).split(settings.micro_batch):
                x = inputs[chunk].to(device, torch.float32)
                y = targets[chunk].to(device, torch.float32)
                with torch.enable_grad():
                    with autocast(device, settings.compute_dtype):
                        out = unit(x)
                    part = token_errors(out.float(), y, settings.loss, importance).mean() * (len(chunk) / len(idx))
                    part.backward()
                loss += part.item()
            loss = sum_gradients(optimizer, loss)  # process group: gradients and loss summed over the ranks
            beta = rounding_beta(step, settings) if roundings and settings.rounding == "adaround" else None
            if beta is not None:  # after the sum: the same on every rank, counted once
                with torch.enable_grad():
                    # mean over the weights, in units of the unit's loss at the first step (scale-free)
                    total = sum(m.weight_quantizer.rounding_regulariser(beta) for m in rounded)
                    reg = settings.round_reg * (losses[0] if losses else loss) * total / num_rounded
                    reg.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4g}")
            if on_step is not None:
                on_step(step)
    finally:
        for p in unit.parameters():  # no gradient buffers left behind (a model's size in memory)
            p.grad = None
        for module, mode in modes:
            module.training = mode
        for q in dropping:
            q.qdrop = 0.0
        if settings.learn_scales:
            freeze_scales(unit)
        for m in rounded:
            m.weight_quantizer.finish_learnt_rounding(m.weight)
    return losses


@torch.no_grad()
def reconstruction_loss(
    unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device, batch_size: int = 64, loss: str = "mse",
    importance: torch.Tensor | None = None,
) -> float:
    """The reconstruction objective of ``unit`` over the whole set (for reports and tests)."""
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        out = unit(inputs[i:i + batch_size].to(device, torch.float32))
        y = targets[i:i + batch_size].to(device, torch.float32)
        total += token_errors(out, y, loss, importance).sum().item()
        count += math.prod(y.shape[:-1])
    return total / count


def has_enabled_quantizer(unit: nn.Module) -> bool:
    return any(isinstance(m, Quantizer) and m.enabled for m in unit.modules())
