"""The named methods, each a short sequence of named stages.

    minmax : wrap (per-tensor activations, uniform post-Softmax) -> calibrate
    repq   : wrap (per-channel post-LayerNorm, log-sqrt2 post-Softmax) -> calibrate
             -> fold the per-channel grids into LayerNorm + Linear -> re-calibrate the new weights
    both then correct the biases (optional: ``bias_correction=False`` gives the published methods)
    isvit  : wrap (per-channel post-LayerNorm, SULQ post-Softmax) -> calibrate activations
             -> stage 1 block reconstruction (full-precision weights) -> stage 2 fold
             -> calibrate weights -> stage 3 sequential block reconstruction (with ``gptq=True``
             each unit's weights are first rounded by GPTQ)

Calibration ("initialisation") is one forward pass over the calibration images with every
quantizer in calibrating mode: each fits itself to what it sees, then quantizes, so later layers are
fitted to the already-quantized outputs of earlier ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .distributed import broadcast_state
from .errors import IsvitError
from .gptq import gptq_unit
from .modules import QuantLinear
from .quantizers import (
    ACTIVATION_PERCENTILES,
    LOW_ACTIVATION_PERCENTILES,
    SOFTMAX_QUANTIZERS,
    Quantizer,
    check_bits,
    named_quantizers,
)
from .reconstruct import (
    LOSSES,
    ROUNDINGS,
    ReconstructionSettings,
    has_enabled_quantizer,
    output_importance,
    reconstruct_unit,
    reconstruction_loss,
    run_unit,
    snap_to_grid,
)
from .reparam import reparameterize_layernorm
from .resume import ResumeState, run_identity
from .rotate import is_rotated, rotate_model
from .wrap import (
    Placement,
    Unit,
    check_supported,
    forward_units,
    is_block,
    post_layernorm_pairs,
    wrap_model,
)

METHODS = ("isvit", "repq", "minmax")
DEFAULT_CALIB_SIZE = {"isvit": 1024, "repq": 32, "minmax": 32}
DEFAULT_SOFTMAX_QUANTIZER = {"isvit": "sulq", "repq": "log2sqrt2", "minmax": "uniform"}
# The training-free methods end with bias correction unless told not to (False reproduces the
# published algorithms); I&S-ViT's reconstruction absorbs the same error by training.
DEFAULT_BIAS_CORRECTION = {"isvit": False, "repq": True, "minmax": True}
# Outlier channels of per-tensor Linear inputs on a grid of their own (quantizers.search_split_range;
# 0 = off): on for isvit, chosen on held-out calibration images (docs/methods.md, outlier channels;
# docs/results.md#how-the-fast-preset-was-chosen); off for the training-free peers, so that they
# stay the published algorithms.
DEFAULT_OUTLIER_RATIO = {"isvit": 8.0, "repq": 0.0, "minmax": 0.0}


@dataclass(frozen=True)
class Recipe:
    """How I&S-ViT trains at one preset and bit range: each field is the default of the
    ``QuantConfig`` field of the same name (``adaround_lr``/``offset_lr``: of ``round_lr`` for that
    rounding). ``act_percentile``: the lowest activation clipping percentile searched (None:
    ACTIVATION_PERCENTILES' 0.999); ``rotate``: rotate the model first (rotate.py)."""

    iters: int  # per unit and stage
    batch_size: int
    lr: float
    loss: str
    drop_prob: float  # QDrop
    rounding: str  # stage 3: "ste" (latent weights, the paper's), "adaround" or "offset"
    adaround_lr: float
    offset_lr: float
    round_reg: float
    scale_lr: float
    learn_scales: bool = False
    act_percentile: float | None = None
    rotate: bool = False


@dataclass(frozen=True)
class Preset:
    """A preset: one recipe above 4 bits, one at <= 4 bits (either of weights or activations)."""

    above_4_bits: Recipe
    low_bits: Recipe

    def recipe(self, w_bits: int, a_bits: int) -> Recipe:
        return self.low_bits if min(w_bits, a_bits) <= 4 else self.above_4_bits


# "paper": I&S-ViT's settings (Adam 4e-5 with cosine decay, batch 64, 1000 iterations per unit at
# 3/4 bits, 200 at 6 bits, plain MSE).
PAPER = Recipe(iters=200, batch_size=64, lr=4e-5, loss="mse", drop_prob=0.0, rounding="ste", adaround_lr=1e-2,
               offset_lr=1e-2, round_reg=0.1, scale_lr=5e-3)
# "fast": for a CPU budget of minutes. Every choice was made on held-out calibration images, never
# on the evaluation set (benchmarks/tune_heldout.py; what each choice did:
# docs/results.md#how-the-fast-preset-was-chosen): a larger learning rate and the token-normalised
# loss to make up for 16x fewer iterations than the paper's, and QDrop. round_lr and round_reg of
# the learnt roundings are larger than AdaRound's usual ones because at so few iterations the usual
# ones leave most rounding variables undecided (chosen on one block with benchmarks/unit_probe.py:
# docs/methods.md, --rounding).
FAST = Recipe(iters=30, batch_size=32, lr=5e-4, loss="token", drop_prob=0.5, rounding="ste", adaround_lr=0.3,
              offset_lr=3e-2, round_reg=1000.0, scale_lr=5e-3)
# At <= 4 bits the fast preset adds what lowered the held-out KL divergence there: activation grids
# searched down to the 0.99 percentile, the rotation, the Fisher-weighted loss, learnt rounding
# offsets and 100 iterations per unit, which still fit the preset's 20-minute CPU budget (measured
# times: docs/results.md#cost).
FAST_LOW_BITS = dataclasses.replace(FAST, iters=100, act_percentile=0.99, rotate=True, loss="fisher", rounding="offset")
# "thorough": the fast recipe with the later methods' GPU budget (3000 iterations per unit at <= 4
# bits, 1000 above), training the latent weights, which did better than the offsets on one block at
# long schedules, with the usual AdaRound settings; a longer schedule kept lowering a block's held-out
# loss (docs/methods.md, presets and --rounding). Not run end to end.
THOROUGH = dataclasses.replace(FAST, iters=1000, adaround_lr=1e-2, offset_lr=1e-2, round_reg=0.1)
PRESETS = {
    "paper": Preset(above_4_bits=PAPER, low_bits=dataclasses.replace(PAPER, iters=1000)),
    "fast": Preset(above_4_bits=FAST, low_bits=FAST_LOW_BITS),
    "thorough": Preset(above_4_bits=THOROUGH, low_bits=dataclasses.replace(THOROUGH, iters=3000, act_percentile=0.99,
                                                                           rotate=True, loss="fisher")),
}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. ``None`` fields take the method's default."""

    method: str = "repq"
    w_bits: int = 4
    a_bits: int = 4
    calib_size: int | None = None
    softmax_quantizer: str | None = None
    seed: int = 0
    bias_correction: bool | None = None
    # I&S-ViT: block reconstruction (defaults from the paper, or the "fast" preset for CPUs)
    preset: str = "paper"
    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    learn_scales: bool | None = None
    loss: str | None = None
    stage1: bool = True
    reparameterize: bool = True
    drop_prob: float | None = None  # QDrop during block reconstruction
    rounding: str | None = None  # stage 3: "ste" (latent weights, the paper's), "adaround" or "offset" (learnt rounding)
    round_lr: float | None = None  # learning rate of AdaRound's rounding variables
    round_reg: float | None = None  # weight of AdaRound's regulariser, relative to each unit's first loss
    scale_lr: float | None = None  # learnt step sizes: Adam's learning rate on log(scale)
    # Lowest clipping percentile searched for activation grids (None: 0.999, the authors' lowest);
    # e.g. 0.99 adds 0.99, 0.995 and 0.998 to the candidates.
    act_percentile: float | None = None
    gptq: bool = False  # stage 3 starts from GPTQ-rounded weights (default: round to nearest, the paper's)
    # Rotate the full-precision model first (rotate.py: Hadamard rotations of the residual stream and
    # of each attention head, exact in float), for every method. None: for isvit at <= 4 bits the
    # preset's, otherwise off.
    rotate: bool | None = None
    # Per-tensor Linear inputs set apart the channels whose peak exceeds this many times the median
    # channel's (a second grid for them; 0: off). None: the method's default.
    outlier_ratio: float | None = None
    init_size: int = 64
    cache_dtype: str = "float32"
    cache_device: str | None = None  # where cached block inputs/outputs live (default: the model's device)

    def __post_init__(self):
        if self.method not in METHODS:
            raise IsvitError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("w_bits", "a_bits"):
            try:
                check_bits(getattr(self, name))
            except ValueError:
                raise IsvitError(f"{name} must be an integer from 2 to 8, got {getattr(self, name)!r}") from None
        if self.softmax_quantizer is not None and self.softmax_quantizer not in SOFTMAX_QUANTIZERS:
            raise IsvitError(
                f"unknown post-Softmax quantizer {self.softmax_quantizer!r}; choose one of {', '.join(SOFTMAX_QUANTIZERS)}"
            )
        if self.calib_size is not None and self.calib_size < 1:
            raise IsvitError(f"calib_size must be at least 1, got {self.calib_size}")
        if self.preset not in PRESETS:
            raise IsvitError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("iters", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise IsvitError(f"{name} must be a positive integer, got {value!r}")
        if self.loss is not None and self.loss not in LOSSES:
            raise IsvitError(f"unknown reconstruction loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.drop_prob is not None and not 0.0 <= self.drop_prob < 1.0:
            raise IsvitError(f"drop_prob must be in [0, 1), got {self.drop_prob!r}")
        if self.outlier_ratio is not None and not (self.outlier_ratio == 0 or self.outlier_ratio > 1):
            raise IsvitError(f"outlier_ratio must be 0 (off) or greater than 1, got {self.outlier_ratio!r}")
        for name in ("lr", "round_lr", "scale_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise IsvitError(f"{name} must be positive, got {value!r}")
        if self.round_reg is not None and not self.round_reg >= 0:
            raise IsvitError(f"round_reg must be zero or positive, got {self.round_reg!r}")
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise IsvitError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if self.act_percentile is not None and not 0.9 <= self.act_percentile <= 1.0:
            raise IsvitError(f"act_percentile must be in [0.9, 1], got {self.act_percentile!r}")
        if self.cache_device is not None:
            try:
                torch.device(self.cache_device)
            except (RuntimeError, TypeError):
                raise IsvitError(f"cache_device must name a torch device such as 'cpu' or 'cuda', got {self.cache_device!r}") from None
        if self.rotate is not None and not isinstance(self.rotate, bool):
            raise IsvitError(f"rotate must be True or False, got {self.rotate!r}")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise IsvitError(f"cache_dtype must be float32, float16 or bfloat16, got {self.cache_dtype!r}")

    @property
    def resolved_calib_size(self) -> int:
        return self.calib_size if self.calib_size is not None else DEFAULT_CALIB_SIZE[self.method]

    @property
    def resolved_softmax_quantizer(self) -> str:
        return self.softmax_quantizer or DEFAULT_SOFTMAX_QUANTIZER[self.method]

    @property
    def resolved_outlier_ratio(self) -> float:
        return self.outlier_ratio if self.outlier_ratio is not None else DEFAULT_OUTLIER_RATIO[self.method]

    @property
    def recipe(self) -> Recipe:
        """The preset's recipe for these bit widths."""
        return PRESETS[self.preset].recipe(self.w_bits, self.a_bits)

    @property
    def resolved_act_percentile(self) -> float | None:
        """The lowest activation clipping percentile searched: the one given, else for ``isvit`` its
        recipe's; None (ACTIVATION_PERCENTILES' lowest, 0.999) for the other methods."""
        if self.act_percentile is not None:
            return self.act_percentile
        return self.recipe.act_percentile if self.method == "isvit" else None

    @property
    def resolved_rotate(self) -> bool:
        """Whether the model is rotated first: as given, else for ``isvit`` as its recipe says."""
        if self.rotate is not None:
            return self.rotate
        return self.recipe.rotate if self.method == "isvit" else False

    @property
    def activation_percentiles(self) -> tuple[float, ...]:
        """The clipping percentiles searched for activation grids."""
        lowest = self.resolved_act_percentile
        if lowest is None:
            return ACTIVATION_PERCENTILES
        extra = (p for p in LOW_ACTIVATION_PERCENTILES if p >= lowest)
        return tuple(sorted({lowest, *extra, *ACTIVATION_PERCENTILES}))

    @property
    def resolved_bias_correction(self) -> bool:
        return self.bias_correction if self.bias_correction is not None else DEFAULT_BIAS_CORRECTION[self.method]

    def reconstruction(self) -> dict:
        """The block-reconstruction settings: the fields given, the recipe's for the others."""
        recipe = self.recipe
        rounding = self.rounding or recipe.rounding
        round_lr = {"adaround": recipe.adaround_lr, "offset": recipe.offset_lr}.get(rounding)  # None: "ste" learns no rounding
        return {
            "iters": self.iters if self.iters is not None else recipe.iters,
            "batch_size": self.batch_size or recipe.batch_size,
            "lr": self.lr or recipe.lr,
            "learn_scales": recipe.learn_scales if self.learn_scales is None else self.learn_scales,
            "loss": self.loss or recipe.loss,
            "drop_prob": recipe.drop_prob if self.drop_prob is None else self.drop_prob,
            "rounding": rounding,
            "round_lr": self.round_lr or round_lr,
            "round_reg": recipe.round_reg if self.round_reg is None else self.round_reg,
            "scale_lr": self.scale_lr or recipe.scale_lr,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bias_correction"] = self.resolved_bias_correction
        if self.method == "isvit":
            d.update(self.reconstruction())
        d["calib_size"] = self.resolved_calib_size
        d["softmax_quantizer"] = self.resolved_softmax_quantizer
        d["outlier_ratio"] = self.resolved_outlier_ratio
        d["act_percentile"] = self.resolved_act_percentile
        d["rotate"] = self.resolved_rotate
        return d


def placement_for(config: QuantConfig) -> Placement:
    """Where the quantizers of ``config``'s method go (wrap.py places them)."""
    return Placement(
        w_bits=config.w_bits,
        a_bits=config.a_bits,
        softmax_quantizer=config.resolved_softmax_quantizer,
        post_ln_per_channel=config.method == "repq" or (config.method == "isvit" and config.reparameterize),
        outlier_ratio=config.resolved_outlier_ratio,
        activation_percentiles=config.activation_percentiles,
    )


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def collect_calibration(calib: torch.Tensor | Iterable, num_images: int) -> torch.Tensor:
    """The first ``num_images`` images of ``calib``: a (N, 3, H, W) tensor, or an iterable of such
    batches or of (images, labels) pairs (a DataLoader)."""
    if isinstance(calib, torch.Tensor):
        batches = [calib]
    else:
        batches, count = [], 0
        for batch in calib:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if not isinstance(batch, torch.Tensor):
                raise IsvitError(f"calibration batches must be image tensors, got {type(batch).__name__}")
            batches.append(batch)
            count += batch.shape[0]
            if count >= num_images:
                break
    if not batches:
        raise IsvitError("the calibration data is empty")
    first = tuple(batches[0].shape[1:])
    other = next((tuple(b.shape[1:]) for b in batches if tuple(b.shape[1:]) != first), None)
    if other is not None:
        raise IsvitError(f"calibration batches must all have one image shape, got {first} and {other}")
    images = torch.cat(batches)[:num_images]
    if images.dim() != 4:
        raise IsvitError(f"calibration images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    return images


def quantizers(model: nn.Module, kind: str = "all") -> list[tuple[str, Quantizer]]:
    """Named quantizers of a wrapped model; ``kind`` is 'all', 'weight' or 'activation'."""
    return named_quantizers(model, kind)


def set_quantizers(model: nn.Module, enabled: bool, kind: str = "all") -> None:
    """Enable or disable quantizers by kind ('all', 'weight', 'activation')."""
    for _, q in quantizers(model, kind):
        q.enabled = enabled


@torch.no_grad()
def calibrate_weights(model: nn.Module, only_uncalibrated: bool = False) -> None:
    """Fit every weight quantizer to its weight (percentile-MSE per output channel)."""
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if isinstance(q, Quantizer) and not (only_uncalibrated and q.is_calibrated):
            q.calibrate(module.weight.detach())


@torch.no_grad()
def calibrate_activations(model: nn.Module, images: torch.Tensor) -> None:
    """Fit every enabled activation quantizer in one forward pass over ``images``.

    One pass, not several batches: each quantizer fits itself to the whole calibration set as it
    sees it and then quantizes it, so every layer is fitted to its quantized inputs.
    """
    for _, q in quantizers(model, "activation"):
        if q.enabled:
            q.calibrating = True
    model(images)


@torch.no_grad()
def correct_bias(model: nn.Module, images: torch.Tensor) -> None:
    """Empirical bias correction, in one forward pass over ``images``.

    For every quantized Linear, in forward order, the mean over the calibration tokens of
    ``W^ x^ + b - (W x + b)`` (its output error on the inputs it really gets in the quantized
    model) is subtracted from its bias; later layers see the corrected outputs. This removes the
    systematic part of the quantization error, e.g. the post-GELU values that a coarse per-tensor
    grid rounds to zero (ViT's few huge activations force a step of ~0.8 on ViT-Ti's fc2 inputs).
    """

    def hook(linear: QuantLinear, inputs, output):
        exact = torch.nn.functional.linear(inputs[0], linear.weight, linear.bias)
        error = (output - exact).reshape(-1, output.shape[-1]).double().mean(dim=0).to(output.dtype)
        linear.bias -= error
        # Recomputed rather than ``output - error``: the two differ by a rounding, which can move a
        # later quantizer's code across a boundary; this way the pass sees exactly what every later
        # forward with the corrected bias computes.
        return linear.forward(inputs[0])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()


def fold_post_layernorm(model: nn.Module) -> None:
    """RepQ-ViT / SOS stage 2: per-channel post-LayerNorm quantizers become per tensor, exactly."""
    for _, norm, linear in post_layernorm_pairs(model):
        reparameterize_layernorm(norm, linear)
        linear.weight_quantizer.scale = torch.empty(0, device=linear.weight.device)  # re-fit on W * r


# ---------------------------------------------------------------------------------------------
# Block reconstruction
# ---------------------------------------------------------------------------------------------

# Steps timed for the duration estimate, after a unit's first step (which also pays one-time costs:
# allocations, the optimizer's state).
ESTIMATE_STEPS = 5


class DurationEstimate:
    """The whole block reconstruction's duration, extrapolated once from its first steps.

    Times steps 1..ESTIMATE_STEPS of the first transformer block trained and calls
    ``callback(seconds)`` with their mean time multiplied by ``total_steps`` (the units trained in
    every stage x the iterations per unit). A rough figure: the patch embedding's and the head's
    steps cost less than a block's, and the forward passes that cache each unit's inputs are not
    counted. Too few iterations to time (fewer than 2): no estimate.
    """

    def __init__(self, callback: Callable[[float], None], total_steps: int, iters: int):
        self.callback = callback
        self.total_steps = total_steps
        self.timed_steps = min(ESTIMATE_STEPS, iters - 1)
        self.done = self.timed_steps < 1
        self.start = 0.0

    def step_callback(self, unit: Unit) -> Callable[[int], None] | None:
        """What ``reconstruct_unit`` calls after each step of ``unit``: the timer for the first block, else None."""
        if self.done or not is_block(unit.body):
            return None
        return self._step

    def _step(self, step: int) -> None:
        if step == 0:
            self.start = time.perf_counter()
        elif step == self.timed_steps:
            self.done = True
            self.callback((time.perf_counter() - self.start) / self.timed_steps * self.total_steps)


def reconstruction_steps(model: nn.Module, config: QuantConfig) -> int:
    """Training steps of ``config``'s block reconstruction on a wrapped ``model`` whose weight
    quantizers are still off (as before stage 1): stage 1 trains the units with an enabled
    quantizer, stage 3 every unit with a quantizer; each for ``iters`` steps."""
    units = forward_units(model)
    stage1 = sum(has_enabled_quantizer(unit) for unit in units) if config.stage1 else 0
    stage3 = sum(any(isinstance(m, Quantizer) for m in unit.modules()) for unit in units)
    return (stage1 + stage3) * config.reconstruction()["iters"]


@torch.no_grad()
def reconstruct_blocks(
    qmodel: nn.Module,
    fp_model: nn.Module,
    images: torch.Tensor,
    settings: ReconstructionSettings,
    *,
    sequential: bool,
    device: torch.device,
    round_weights: bool = False,
    importance: list[torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "",
    estimate: DurationEstimate | None = None,
    run: ResumeState | None = None,
) -> dict[str, tuple[float, float, bool]]:
    """Reconstruct every unit of ``qmodel`` that has an enabled quantizer, in forward order.

    Targets are always the full-precision model's outputs; inputs are the full-precision model's
    (``sequential=False``, stage 1) or the quantized model's so far (``sequential=True``, stage 3).
    A unit whose loss over the first ``settings.check_size`` calibration images ends higher than it
    started is put back as it was (a guard against a learning rate too large for a unit).
    With ``round_weights``, a unit's weights are first rounded by GPTQ on its inputs (the first
    ``settings.check_size`` images), and training starts from there. ``importance``: one output
    importance map per unit (``output_importance``), for the "fisher" loss. ``estimate`` times the
    steps it asks for.
    Returns {unit: (loss before, loss after training, restored)} on those images; a restored unit
    is back at its loss before.

    In a process group each rank caches only its shard of the images' activations (``shard``); the
    check losses are averaged over the ranks, so every rank decides alike, and every finished unit
    is broadcast from rank 0. With ``run``, each finished unit (and the whole stage, named ``desc``)
    is saved, and the units it already finished are not trained again (their inputs are recomputed).
    """
    run = run or ResumeState()
    if run.done(desc):
        return run.result(desc)
    cache_device = settings.cache_device or device
    q_units, fp_units = forward_units(qmodel), forward_units(fp_model)
    shard = distributed.split(images.shape[0])
    x_fp = images[shard.slice].to(cache_device, settings.cache_dtype)
    x_q = x_fp if sequential else None
    report = {}
    for i, (q_unit, fp_unit) in enumerate(zip(q_units, fp_units)):
        y_fp = run_unit(fp_unit, x_fp, device, settings.batch_size, settings.cache_dtype, cache_device)
        step = f"{desc} {q_unit.name}"
        if run.done(step):
            report[q_unit.name] = run.result(step)
        elif has_enabled_quantizer(q_unit) and settings.iters > 0:
            inputs = x_q if sequential else x_fp
            check = shard.head(settings.check_size)
            weight = importance[i].to(device) if importance is not None else None
            if round_weights:
                gptq_unit(q_unit, inputs[check], device, settings.batch_size)
                broadcast_state(q_unit)
            before = _check_loss(q_unit, inputs[check], y_fp[check], device, settings, weight)
            snapshot = copy.deepcopy(q_unit.body.state_dict())
            reconstruct_unit(q_unit, inputs, y_fp, settings, device, importance=weight, progress=progress, desc=step,
                             on_step=estimate.step_callback(q_unit) if estimate else None, shard=shard)
            after = _check_loss(q_unit, inputs[check], y_fp[check], device, settings, weight)
            restored = after > before
            if restored:
                q_unit.body.load_state_dict(snapshot)
                if settings.rounding != "ste":  # learnt rounding ends on the grid, also where it was undone
                    snap_to_grid(q_unit)
            report[q_unit.name] = (before, after, restored)
            broadcast_state(q_unit)
            run.finish(step, qmodel, report[q_unit.name])
        if sequential:
            x_q = run_unit(q_unit, x_q, device, settings.batch_size, settings.cache_dtype, cache_device)
        x_fp = y_fp
    run.finish(desc, qmodel, report)
    return report


def _check_loss(unit: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device, settings, importance=None) -> float:
    """The reconstruction loss on the check images, every rank's part of them together."""
    local = (reconstruction_loss(unit, inputs, targets, device, settings.batch_size, settings.loss, importance)
             if len(inputs) else 0.0)
    return distributed.mean_over_ranks(local, len(inputs))


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

def _training_free(model: nn.Module, images: torch.Tensor, config: QuantConfig, progress: bool, run: ResumeState) -> None:
    """minmax / repq: wrap, calibrate (and fold + re-calibrate for repq), correct biases.

    Every rank of a process group runs every step on all the images; rank 0's result is broadcast.
    """
    steps = ["wrap", "calibrate"]
    if config.method == "repq":
        steps += ["reparameterise", "re-calibrate"]
    if config.resolved_bias_correction:
        steps += ["correct bias"]
    bar = tqdm(steps, desc=f"{config.method} W{config.w_bits}/A{config.a_bits}", disable=not progress, leave=False)
    for step in bar:
        bar.set_postfix_str(step)
        if step == "wrap":
            wrap_model(model, placement_for(config))
            run.restore(model)
        elif run.done(step):
            continue
        elif step == "calibrate":
            calibrate_weights(model)
            calibrate_activations(model, images)
        elif step == "reparameterise":
            fold_post_layernorm(model)
        elif step == "re-calibrate":
            calibrate_weights(model, only_uncalibrated=True)
        elif step == "correct bias":
            correct_bias(model, images)
        if step != "wrap":
            run.finish(step, model)
    broadcast_state(model)


def _isvit(
    model: nn.Module, images: torch.Tensor, config: QuantConfig, device: torch.device, progress: bool, run: ResumeState,
    on_estimate: Callable[[float], None] | None = None,
) -> dict:
    """I&S-ViT: SULQ post-Softmax and the three-stage smooth optimisation (SOS).

    stage 1: activations quantized (post-LayerNorm per channel), weights full precision; every
             unit trained towards the full-precision model on full-precision inputs;
    stage 2: the per-channel post-LayerNorm grids folded into LayerNorm + Linear (exact);
    stage 3: weights quantized per output channel; units trained again in sequence, on the
             quantized model's own inputs, towards the full-precision outputs.

    In a process group every rank initialises the quantizers on the same images and rank 0's values
    are broadcast; the reconstruction shares each batch over the ranks (``reconstruct_blocks``).
    ``run`` saves the state after each finished step and skips the steps it already finished.
    """
    fp_model = copy.deepcopy(model)
    for p in fp_model.parameters():
        p.requires_grad_(False)
    settings = ReconstructionSettings(
        **config.reconstruction(),
        cache_dtype=getattr(torch, config.cache_dtype),
        cache_device=torch.device(config.cache_device) if config.cache_device else None,
        seed=config.seed,
    )
    importance = None
    if settings.loss == "fisher":
        importance = output_importance(forward_units(fp_model), images, device, settings.batch_size, config.seed)
    wrap_model(model, placement_for(config))
    run.restore(model)
    set_quantizers(model, False, "weight")
    estimate = None
    if on_estimate is not None:
        estimate = DurationEstimate(on_estimate, reconstruction_steps(model, config), settings.iters)
    if not run.done("calibrate activations"):
        calibrate_activations(model, images[: config.init_size].to(device))
        broadcast_state(model)
        run.finish("calibrate activations", model)
    report = {}
    if config.stage1:
        stage1 = dataclasses.replace(settings, rounding="ste")  # no weight is quantized yet
        report["stage1"] = reconstruct_blocks(
            model, fp_model, images, stage1, sequential=False, device=device, importance=importance,
            progress=progress, desc="stage 1", estimate=estimate, run=run,
        )
    set_quantizers(model, True, "weight")
    if not run.done("fold and calibrate weights"):
        if config.reparameterize:
            fold_post_layernorm(model)
        calibrate_weights(model)
        broadcast_state(model)
        run.finish("fold and calibrate weights", model)
    report["stage3"] = reconstruct_blocks(
        model, fp_model, images, settings, sequential=True, device=device, round_weights=config.gptq,
        importance=importance, progress=progress, desc="stage 3", estimate=estimate, run=run,
    )
    if config.resolved_bias_correction and not run.done("bias correction"):
        correct_bias(model, images[: config.init_size].to(device))
        broadcast_state(model)
        run.finish("bias correction", model)
    return report


def quantize(
    model: nn.Module,
    calib: torch.Tensor | Iterable,
    config: QuantConfig = QuantConfig(),
    *,
    device: str | torch.device | None = None,
    inplace: bool = False,
    progress: bool = True,
    on_estimate: Callable[[float], None] | None = None,
    resume_dir: str | Path | None = None,
    losses: dict | None = None,
) -> nn.Module:
    """Quantize a timm model of a supported family (``isvit.families``) with the method of ``config``
    and return the quantized model.

    ``calib``: unlabeled calibration images, a (N, 3, H, W) tensor already preprocessed as the
    model expects, or an iterable of such batches (a DataLoader of (images, labels) works too).
    ``device``: where calibration runs (default: where the model is). The model is copied unless
    ``inplace``. With ``config.resolved_rotate`` it is rotated first (``rotate.rotate_model``). The model
    returned is in eval mode. ``on_estimate(seconds)`` (``isvit`` only) is called once, after the
    first few block-reconstruction steps, with the seconds that the whole reconstruction is expected
    to take (``DurationEstimate``).

    ``resume_dir``: a folder where the state after each finished step is saved (``resume.py``); a
    run started again with the same model, images and config carries on from the last finished
    step, and ends with the model an uninterrupted run would have given.

    Inside a process group (``torchrun``, or ``torch.distributed.init_process_group``) every rank
    calls ``quantize`` with the same model, images and config; they share the work
    (``distributed.py``) and all return the same model. Only rank 0 shows progress and writes the
    resume state.

    ``losses`` (``isvit`` only): a dict that is filled with each stage's reconstruction losses,
    ``{"stage1": {unit: (before, after, restored)}, "stage3": {...}}`` (``reconstruct_blocks``), the
    losses on the first check images before and after each unit's training: what the benchmarks
    compare between recipes (e.g. the start of stage 3 with and without stage 1).
    """
    check_supported(model)  # an architecture isvit cannot wrap is refused before any work
    if not inplace:
        model = copy.deepcopy(model)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    model.eval()
    images = collect_calibration(calib, config.resolved_calib_size)
    run = _open_run(model, images, config, resume_dir)
    if config.resolved_rotate:  # before the methods: isvit's full-precision targets share the rotated basis
        _rotate(model, config)
    progress = progress and distributed.is_main()
    torch.manual_seed(config.seed + distributed.rank())  # QDrop's masks: a stream of its own on each rank
    if config.method == "isvit":
        report = _isvit(model, images, config, device, progress, run, on_estimate)
        if losses is not None:
            losses.update(report)
    else:
        _training_free(model, images.to(device), config, progress, run)
    return model.eval()  # the quantized modules swapped in are new modules: eval mode for them too


def applied_config(model: nn.Module, config: QuantConfig) -> QuantConfig:
    """``config`` as ``quantize`` carried it out on ``model``: ``rotate`` says whether the model was
    rotated (the presets skip a rotation the model cannot take, with a warning). Saved files and
    reports record this, not what the preset asked."""
    return dataclasses.replace(config, rotate=is_rotated(model))


def _rotate(model: nn.Module, config: QuantConfig) -> None:
    """``rotate.rotate_model``. A model it cannot rotate (``IsvitError``, raised before any weight
    changes) while only the preset asked for it (``config.rotate`` None) is quantized without, with
    one warning that says why; where the caller asked (``rotate=True``) the error stands."""
    try:
        rotate_model(model, seed=config.seed)
    except IsvitError as exc:
        if config.rotate is not None:
            raise
        if distributed.is_main():
            warnings.warn(f"{exc}: quantizing it without the {config.preset} preset's rotation "
                          "(--no-rotate, or rotate=False, does so without this warning)", stacklevel=3)


def _open_run(model: nn.Module, images: torch.Tensor, config: QuantConfig, resume_dir: str | Path | None) -> ResumeState:
    """The resume state of this run (none without ``resume_dir``), after checking, in a process
    group, that every rank was given the same model, images and config."""
    if not (distributed.is_distributed() or resume_dir is not None):
        return ResumeState()
    if images.shape[0] < distributed.world_size():
        raise IsvitError(f"{images.shape[0]} calibration images cannot be shared by {distributed.world_size()} processes")
    identity = run_identity(model, config.to_dict(), images)
    distributed.check_same(json.dumps(identity, sort_keys=True), "models, calibration images or configurations")
    return ResumeState.open(resume_dir, identity)
