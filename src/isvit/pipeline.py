"""The named methods, each a short sequence of named stages.

    minmax : wrap (per-tensor activations, uniform post-Softmax) -> calibrate
    repq   : wrap (per-channel post-LayerNorm, log-sqrt2 post-Softmax) -> calibrate
             -> fold the per-channel grids into LayerNorm + Linear -> re-calibrate the new weights
    both then correct the biases (optional: ``bias_correction=False`` gives the published methods)
    isvit  : wrap (per-channel post-LayerNorm, SULQ post-Softmax) -> calibrate activations
             -> stage 1 block reconstruction (full-precision weights) -> stage 2 fold
             -> calibrate weights -> stage 3 sequential block reconstruction (with ``gptq=True``
             each unit's weights are first rounded by GPTQ) -> the end-to-end stage, where the
             config asks for it (endtoend.py: the whole model against the full-precision outputs)

What each method reads is its config (config.py: ``MinmaxConfig``, ``RepqConfig``, ``IsvitConfig``).
Calibration ("initialisation") is one forward pass over the calibration images with every
quantizer in calibrating mode: each fits itself to what it sees, then quantizes, so later layers are
fitted to the already-quantized outputs of earlier ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .config import Config, IsvitConfig, MinmaxConfig, Reconstruction, RepqConfig
from .distributed import broadcast_state
from .endtoend import loss_of, split_holdout, train_end_to_end
from .errors import IsvitError
from .gptq import gptq_unit
from .modules import QuantLinear
from .quantizers import Quantizer, named_quantizers
from .reconstruct import (
    compute_dtype_on,
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
    Unit,
    check_supported,
    forward_units,
    is_block,
    post_layernorm_pairs,
    wrap_model,
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
    """The whole reconstruction's duration (the end-to-end stage's with it), extrapolated once from its first steps.

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


def reconstruction_steps(model: nn.Module, config: IsvitConfig, images: int = 0) -> int:
    """Training steps of ``config``'s block reconstruction on a wrapped ``model`` whose weight
    quantizers are still off (as before stage 1): stage 1 trains the units with an enabled
    quantizer, stage 3 every unit with a quantizer (``training_steps`` counts them)."""
    units = forward_units(model)
    return training_steps(config, stage1_units=sum(has_enabled_quantizer(unit) for unit in units),
                          stage3_units=sum(any(isinstance(m, Quantizer) for m in unit.modules()) for unit in units),
                          blocks=sum(is_block(unit.body) for unit in units), images=images)


def training_steps(config: IsvitConfig, *, stage1_units: int, stage3_units: int, blocks: int, images: int = 0) -> int:
    """Steps of ``config``'s training, counted in block-steps of its reconstruction batch: stage 1
    and stage 3 train their units ``iters`` steps each; with the end-to-end stage on ``images``
    calibration images, each of its steps counts as one step of every block (scaled by the two
    batch sizes): it runs the whole model forward and backward. Times the reconstruction's batch
    size, it compares the work of two configs."""
    resolved = config.resolved()
    steps = ((stage1_units if config.stage1 else 0) + stage3_units) * resolved.reconstruction.iters
    e2e = resolved.end_to_end
    if e2e.epochs and images > e2e.holdout:
        e2e_steps = e2e.epochs * math.ceil((images - e2e.holdout) / e2e.batch_size)
        steps += round(e2e_steps * blocks * e2e.batch_size / resolved.reconstruction.batch_size)
    return steps


@torch.no_grad()
def reconstruct_blocks(
    qmodel: nn.Module,
    fp_model: nn.Module,
    images: torch.Tensor,
    settings: Reconstruction,
    *,
    sequential: bool,
    device: torch.device,
    seed: int = 0,
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
    cache_device = torch.device(settings.cache_device) if settings.cache_device else device
    cache_dtype = getattr(torch, settings.cache_dtype)
    q_units, fp_units = forward_units(qmodel), forward_units(fp_model)
    shard = distributed.split(images.shape[0])
    x_fp = images[shard.slice].to(cache_device, cache_dtype)
    x_q = x_fp if sequential else None
    report = {}
    for i, (q_unit, fp_unit) in enumerate(zip(q_units, fp_units)):
        y_fp = run_unit(fp_unit, x_fp, device, settings.batch_size, cache_dtype, cache_device)
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
            reconstruct_unit(q_unit, inputs, y_fp, settings, device, seed=seed, importance=weight, progress=progress,
                             desc=step, on_step=estimate.step_callback(q_unit) if estimate else None, shard=shard)
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
            x_q = run_unit(q_unit, x_q, device, settings.batch_size, cache_dtype, cache_device)
        x_fp = y_fp
    for p in qmodel.parameters():  # the units' extras (class token, position embedding) keep gradients too
        p.grad = None
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

def _training_free(model: nn.Module, images: torch.Tensor, config: Config, progress: bool, run: ResumeState) -> None:
    """minmax / repq: wrap, calibrate (and fold + re-calibrate for repq), correct biases.

    Every rank of a process group runs every step on all the images; rank 0's result is broadcast.
    """
    steps = ["wrap", "calibrate"]
    if config.method == "repq":
        steps += ["fold", "re-calibrate"]
    if config.bias_correction:
        steps += ["correct bias"]
    bar = tqdm(steps, desc=f"{config.method} W{config.w_bits}/A{config.a_bits}", disable=not progress, leave=False)
    for step in bar:
        bar.set_postfix_str(step)
        if step == "wrap":
            wrap_model(model, config.placement())
            run.restore(model)
        elif run.done(step):
            continue
        elif step == "calibrate":
            calibrate_weights(model)
            calibrate_activations(model, images)
        elif step == "fold":
            fold_post_layernorm(model)
        elif step == "re-calibrate":
            calibrate_weights(model, only_uncalibrated=True)
        elif step == "correct bias":
            correct_bias(model, images)
        if step != "wrap":
            run.finish(step, model)
    broadcast_state(model)


def _isvit(
    model: nn.Module, images: torch.Tensor, config: IsvitConfig, device: torch.device, progress: bool, run: ResumeState,
    on_estimate: Callable[[float], None] | None = None, seconds: dict | None = None,
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
    ``seconds`` is filled with each stage's duration.
    """
    seconds = {} if seconds is None else seconds
    clock = time.perf_counter()
    end_to_end = config.resolved().end_to_end
    # the end-to-end stage's kept images (the last ones) are no stage's training images: the block
    # stages fit their images far better than others, so kept images they saw would not tell it when to stop
    all_images = images
    if end_to_end.epochs:
        images, _ = split_holdout(images, end_to_end.holdout)
    fp_model = copy.deepcopy(model)
    for p in fp_model.parameters():
        p.requires_grad_(False)
    settings = config.resolved().reconstruction
    importance = None
    if settings.loss == "fisher":
        importance = output_importance(forward_units(fp_model), images, device, settings.batch_size, config.seed)
    wrap_model(model, config.placement())
    run.restore(model)
    set_quantizers(model, False, "weight")
    estimate = None
    if on_estimate is not None:
        estimate = DurationEstimate(on_estimate, reconstruction_steps(model, config, len(all_images)), settings.iters)
    if not run.done("calibrate activations"):
        calibrate_activations(model, images[: config.init_size].to(device))
        broadcast_state(model)
        run.finish("calibrate activations", model)
    report = {}
    seconds["initialise"], clock = time.perf_counter() - clock, time.perf_counter()
    if config.stage1:
        stage1 = dataclasses.replace(settings, rounding="ste")  # no weight is quantized yet
        report["stage1"] = reconstruct_blocks(
            model, fp_model, images, stage1, sequential=False, device=device, seed=config.seed, importance=importance,
            progress=progress, desc="stage 1", estimate=estimate, run=run,
        )
        seconds["stage1"], clock = time.perf_counter() - clock, time.perf_counter()
    set_quantizers(model, True, "weight")
    if not run.done("fold and calibrate weights"):
        if config.fold:
            fold_post_layernorm(model)
        calibrate_weights(model)
        broadcast_state(model)
        run.finish("fold and calibrate weights", model)
    report["stage3"] = reconstruct_blocks(
        model, fp_model, images, settings, sequential=True, device=device, seed=config.seed, round_weights=config.gptq,
        importance=importance, progress=progress, desc="stage 3", estimate=estimate, run=run,
    )
    seconds["stage2+3"], clock = time.perf_counter() - clock, time.perf_counter()
    if end_to_end.epochs:
        report["end_to_end"] = train_end_to_end(model, fp_model, all_images, end_to_end, device=device,
                                                seed=config.seed, progress=progress, run=run)
        seconds["end_to_end"], clock = time.perf_counter() - clock, time.perf_counter()
    if config.bias_correction and not run.done("bias correction"):
        correct_bias(model, images[: config.init_size].to(device))
        broadcast_state(model)
        run.finish("bias correction", model)
    return report


def quantize(
    model: nn.Module,
    calib: torch.Tensor | Iterable,
    config: Config,
    *,
    device: str | torch.device | None = None,
    inplace: bool = False,
    progress: bool = True,
    on_estimate: Callable[[float], None] | None = None,
    resume_dir: str | Path | None = None,
    losses: dict | None = None,
    seconds: dict | None = None,
) -> nn.Module:
    """Quantize a timm model of a supported family (``isvit.families``) with the method of ``config``
    and return the quantized model.

    ``calib``: unlabeled calibration images, a (N, 3, H, W) tensor already preprocessed as the
    model expects, or an iterable of such batches (a DataLoader of (images, labels) works too).
    ``device``: where calibration runs (default: where the model is). The model is copied unless
    ``inplace``. With ``config.wants_rotation()`` it is rotated first (``rotate.rotate_model``). The model
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
    compare between recipes (e.g. the start of stage 3 with and without stage 1); with the
    end-to-end stage also ``"end_to_end": {"end to end epoch N": [loss of each step]}``.
    ``seconds`` (``isvit`` only): a dict filled with each stage's duration in seconds.
    """
    check_supported(model)  # an architecture isvit cannot wrap is refused before any work
    if not inplace:
        model = copy.deepcopy(model)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    model.eval()
    if not isinstance(config, (IsvitConfig, RepqConfig, MinmaxConfig)):
        raise IsvitError(f"config must be an IsvitConfig, RepqConfig or MinmaxConfig, got {type(config).__name__}")
    images = collect_calibration(calib, config.calib_size)
    run = _open_run(model, images, config, resume_dir)
    if config.wants_rotation():  # before the methods: isvit's full-precision targets share the rotated basis
        _rotate(model, config)
    progress = progress and distributed.is_main()
    torch.manual_seed(config.seed + distributed.rank())  # QDrop's masks: a stream of its own on each rank
    if config.method == "isvit":
        report = _isvit(model, images, config, device, progress, run, on_estimate, seconds)
        if losses is not None:
            losses.update(report)
    else:
        _training_free(model, images.to(device), config, progress, run)
    return model.eval()  # the quantized modules swapped in are new modules: eval mode for them too


def applied_config(model: nn.Module, config: Config) -> Config:
    """``config`` as ``quantize`` carried it out on ``model``: resolved (the preset's settings filled
    in), and ``rotate`` says whether the model was rotated (the presets skip a rotation the model
    cannot take, with a warning). The compute dtype "auto" of the reconstruction and the end-to-end
    stage is recorded as the one they ran in on the model's device, the end-to-end loss "auto" of a
    stage that ran as the one it took for this model. Saved files and reports record this, not what
    the preset asked."""
    applied = dataclasses.replace(config.resolved(), rotate=is_rotated(model))
    if isinstance(applied, IsvitConfig) and applied.end_to_end.epochs:
        e2e = applied.end_to_end
        applied = dataclasses.replace(applied, end_to_end=dataclasses.replace(e2e, loss=loss_of(model, e2e.loss)))
    return compute_dtypes_on(applied, next(model.parameters()).device)


def compute_dtypes_on(config: Config, device) -> Config:
    """A resolved ``config`` with the compute dtypes "auto" of its reconstruction and end-to-end
    stage replaced by the ones they run in on ``device`` (``compute_dtype_on``)."""
    if not isinstance(config, IsvitConfig):
        return config
    recon, e2e = config.reconstruction, config.end_to_end
    return dataclasses.replace(
        config, reconstruction=dataclasses.replace(recon, compute_dtype=compute_dtype_on(device, recon.compute_dtype)),
        end_to_end=dataclasses.replace(e2e, compute_dtype=compute_dtype_on(device, e2e.compute_dtype)))


def _rotate(model: nn.Module, config: Config) -> None:
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


def _open_run(model: nn.Module, images: torch.Tensor, config: Config, resume_dir: str | Path | None) -> ResumeState:
    """The resume state of this run (none without ``resume_dir``), after checking, in a process
    group, that every rank was given the same model, images and config."""
    if not (distributed.is_distributed() or resume_dir is not None):
        return ResumeState()
    if images.shape[0] < distributed.world_size():
        raise IsvitError(f"{images.shape[0]} calibration images cannot be shared by {distributed.world_size()} processes")
    identity = run_identity(model, config.to_dict(), images)
    distributed.check_same(json.dumps(identity, sort_keys=True), "models, calibration images or configurations")
    return ResumeState.open(resume_dir, identity)
