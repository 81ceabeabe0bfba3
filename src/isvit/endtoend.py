"""The end-to-end stage: after block reconstruction, the whole quantized model trained at once
towards the full-precision model's outputs.

Block-wise reconstruction trains each unit against its own full-precision output, so an error that
only shows downstream (a small change of a block's output that the later blocks amplify) is never
trained against. Here one loss is taken at the model's output, on the calibration images:

    "kl" : KL(p_fp || p_q) of the output distributions (softmax over the last axis), per image
    "mse": each output token's squared error divided by its full-precision variance (the "token"
           loss of reconstruct.py), for models whose outputs are features
    "auto": "kl" for a classifier, "mse" for a feature tower (``loss_of``)

With ``augment``, each batch is a random view of the images (a flip and a crop, ``augment``) and
the full-precision targets are computed on it: the block stages have fitted the calibration images
themselves far better than other images, and the same images seen again teach little.

What trains (``trainable``): the step size of every enabled uniform quantizer, weights' and
activations' (LSQ in the log domain, ``quantizers.UniformQuantizer.learnable_scale``), and the float
parameters that are not quantized weights (biases, LayerNorm affines, position embeddings, class
tokens). The quantized weights keep their values: their integer codes move only as their step
sizes do (the end-to-end step-size training of EfficientQAT, plus the parameters that fold into
the next scale and bias). Two more kinds train where their learning rates are above 0: each
quantized weight's rounding offset (``round_lr``; in steps, within one code up or down of where the
block stages left it, through the rounding's straight-through estimator, written into the weight
at the end of each epoch) and the post-Softmax SULQ grids (``softmax_lr``: log eta and the top of
the log2 range, the first level held, ``quantizers.SULQuantizer.learnable_grid``). Adam with cosine
decay to 0 over all the epochs' steps; each epoch is one pass over the calibration images in an
order drawn from ``seed`` and the epoch.

With ``holdout``, that many of the calibration images (the last ones) are kept out of the training
and choose when it stops: the stage's loss on them is measured before the first epoch and after
each; when an epoch raised it, the model goes back to where that epoch started and the stage ends
(the epochs that pay differ by model and seed). ``quantize`` keeps them from the block stages too:
those fit their own images far better than others (held-out W3/A3: KL 0.39 on them, 2.05 on other
images), and images they fitted would say the first epoch made things worse when it did not.

At the end of every epoch what was learnt is folded into the model (``finish_training``: the
offsets into the weights, the factors into the scales and grids) and the state is saved with
``run`` (the optimizer's moments and the held-out losses with it): a run killed between epochs and
started again computes exactly what an uninterrupted one does. In a process group every rank
draws the same batches, computes the part of each batch it holds, and the gradients are summed
over the ranks before each step (``distributed.sum_gradients``), as in the block stage.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .config import EndToEnd
from .distributed import local_part, sum_gradients
from .errors import IsvitError
from .modules import QuantConv2d, QuantLinear
from .quantizers import SULQuantizer, named_quantizers
from .reconstruct import autocast, freeze_scales, rounded_layers, scale_parameters
from .resume import ResumeState


def trainable(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(step-size factors, float parameters) that the stage trains: every enabled, calibrated uniform
    quantizer's learnable step size (a grid with outlier channels of its own keeps its two scales,
    which a per-tensor integer product needs), and every float parameter but the weights of the
    quantized layers."""
    scales = scale_parameters(model, weights=True)
    quantized = {id(m.weight) for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    scale_ids = {id(p) for p in scales}
    floats = [p for p in model.parameters()
              if p.dtype.is_floating_point and id(p) not in quantized and id(p) not in scale_ids]
    return scales, floats


def start_training(model: nn.Module, settings: EndToEnd) -> list[dict]:
    """The optimizer's parameter groups, in a fixed order (a resumed run's moments must find their
    parameters): step sizes, float parameters, and where their learning rates are above 0 the
    weights' rounding offsets (one code up or down from where they are) and the post-Softmax SULQ
    grids. ``finish_training`` writes what they learnt back into the model."""
    scales, floats = trainable(model)
    groups = [{"params": scales, "lr": settings.scale_lr}, {"params": floats, "lr": settings.lr}]
    if settings.round_lr > 0:
        roundings = [m.weight_quantizer.start_learnt_rounding(m.weight, "offset", limit=1.0)
                     for m in rounded_layers(model)]
        groups.append({"params": roundings, "lr": settings.round_lr})
    if settings.softmax_lr > 0:
        grids = [q.learnable_grid() for _, q in named_quantizers(model)
                 if isinstance(q, SULQuantizer) and q.enabled and q.is_calibrated]
        groups.append({"params": grids, "lr": settings.softmax_lr})
    return [g for g in groups if g["params"]]


def finish_training(model: nn.Module) -> None:
    """The learnt rounding written into the weights (on their grids, at the learnt step size), then
    the step sizes and SULQ grids folded into their quantizers' buffers."""
    for m in rounded_layers(model):
        if m.weight_quantizer.learning_rounding:
            m.weight_quantizer.finish_learnt_rounding(m.weight)
    for q in model.modules():
        if isinstance(q, SULQuantizer):
            q.freeze_grid()
    freeze_scales(model)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``images`` flipped left-right with probability 1/2 and cut to one random square of 60-100%
    of the shorter side, resized back (bilinear): one draw from ``generator`` for the whole batch,
    so that every rank of a process group draws alike whatever part of the batch it holds."""
    flip, side, top, left = torch.rand(4, generator=generator).tolist()
    h, w = images.shape[-2:]
    size = round(min(h, w) * (0.6 + 0.4 * side))
    top, left = round(top * (h - size)), round(left * (w - size))
    out = images[..., top:top + size, left:left + size]
    if out.shape[-2:] != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return out.flip(-1) if flip < 0.5 else out


def split_holdout(images: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the images trained on, the last ``holdout`` images kept out); a holdout that leaves no image
    to train on is refused in one sentence."""
    if holdout >= images.shape[0]:
        raise IsvitError(f"the end-to-end stage's holdout ({holdout} images) leaves none of the "
                         f"{images.shape[0]} calibration images to train on")
    return images[: images.shape[0] - holdout], images[images.shape[0] - holdout:]


def loss_of(model: nn.Module, loss: str) -> str:
    """``loss`` with "auto" made "kl" for a classifier (timm's ``num_classes`` above 0) and "mse"
    for a feature tower (``num_classes=0``: its outputs are features, not logits)."""
    if loss != "auto":
        return loss
    return "kl" if getattr(model, "num_classes", 1) else "mse"


def output_loss(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per image: the KL divergence of the output distributions ("kl"), or the mean over the output's
    tokens of the squared error relative to the target token's variance ("mse")."""
    out, target = out.float(), target.float()
    if loss == "kl":
        log_q, log_p = out.log_softmax(dim=-1), target.log_softmax(dim=-1)
        per = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    elif loss == "mse":
        per = (out - target).pow(2).sum(dim=-1) / target.var(dim=-1, unbiased=False).clamp_min(1e-6)
    else:  # "auto" needs the model: loss_of
        raise ValueError(f"output_loss takes 'kl' or 'mse', got {loss!r}")
    return per.reshape(out.shape[0], -1).mean(dim=1)


@torch.no_grad()
def _outputs(model: nn.Module, images: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, images.shape[0], batch_size)]) if len(images) else torch.empty(0)


@torch.no_grad()
def evaluate_loss(qmodel: nn.Module, fp_model: nn.Module, images: torch.Tensor, device, loss: str = "kl",
                  batch_size: int = 32) -> float:
    """The stage's loss of ``qmodel`` on ``images``, averaged over them (for reports and tests)."""
    out, target = _outputs(qmodel, images, device, batch_size), _outputs(fp_model, images, device, batch_size)
    return output_loss(out, target, loss).mean().item()


def backward_batch(qmodel: nn.Module, fp_model: nn.Module, local: torch.Tensor, targets: torch.Tensor | None,
                   batch: torch.Tensor, shard, settings: EndToEnd, *, device, view: int | None = None) -> float:
    """The gradient of the loss of ``batch`` (indices into all the calibration images) on this
    rank's part of it (``local``: this rank's images, ``targets``: their full-precision outputs),
    run in chunks of ``settings.micro_batch`` and added to the parameters' ``.grad``; each image
    weighs 1/len(batch), so that the ranks' gradients summed (``distributed.sum_gradients``) are the
    whole batch's. With ``view`` (a seed), the chunks are cut by ``augment`` and their targets
    computed on the view. Returns this rank's part of the loss."""
    loss, name = 0.0, loss_of(fp_model, settings.loss)
    with torch.enable_grad():
        for chunk in local_part(batch, shard).split(settings.micro_batch):
            x = local[chunk].to(device)
            if view is None:
                target = targets[chunk].to(device)
            else:
                x = augment(x, torch.Generator().manual_seed(view))
                with torch.no_grad():
                    target = fp_model(x)
            with autocast(device, settings.compute_dtype):
                out = qmodel(x)
            part = output_loss(out, target, name).sum() / len(batch)
            part.backward()
            loss += part.item()
    return loss


def train_end_to_end(
    qmodel: nn.Module,
    fp_model: nn.Module,
    images: torch.Tensor,
    settings: EndToEnd,
    *,
    device,
    seed: int = 0,
    progress: bool = True,
    run: ResumeState | None = None,
    desc: str = "end to end",
) -> dict[str, list[float]]:
    """Train ``qmodel`` (quantized, in place) towards ``fp_model`` on the calibration ``images`` for
    ``settings.epochs`` epochs (fewer where ``settings.holdout`` stops it); returns
    {"<desc> epoch N": [loss of each step]} (each rank's: the summed loss of the whole batch) and,
    with a holdout, {"<desc> held-out": [loss before, after epoch 1, ...]}. ``run`` saves the state
    after each epoch and skips the epochs it has."""
    run = run or ResumeState()
    if settings.epochs == 0:
        return {}
    settings = dataclasses.replace(settings, loss=loss_of(fp_model, settings.loss))
    images, kept = split_holdout(images, settings.holdout)
    shard, kept_shard = distributed.split(images.shape[0]), distributed.split(kept.shape[0])
    local, kept = images[shard.slice], kept[kept_shard.slice]
    # this rank's images' full-precision outputs (with augmentation: computed for each batch as drawn)
    targets = None if settings.augment else _outputs(fp_model, local, device, settings.micro_batch)
    kept_targets = _outputs(fp_model, kept, device, settings.micro_batch)

    def held_out_loss() -> float:  # every rank's part of the kept images together
        out = _outputs(qmodel, kept, device, settings.micro_batch)
        local_loss = output_loss(out, kept_targets, settings.loss).mean().item() if len(kept) else 0.0
        return distributed.mean_over_ranks(local_loss, len(kept))

    steps_per_epoch = math.ceil(images.shape[0] / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    report, state, held = {}, None, []
    modes = [(m, m.training) for m in qmodel.modules()]
    qmodel.eval()  # dropout / drop-path off: the function trained is the eval-mode one
    try:
        for epoch in range(1, settings.epochs + 1):
            name = f"{desc} epoch {epoch}"
            if run.done(name):
                state = run.result(name)
                report[name], held = state["losses"], state.get("held_out", [])
                if state.get("stopped"):
                    break
                continue
            if settings.holdout and not held:
                held = [held_out_loss()]  # the block stages' model
            start = copy.deepcopy(qmodel.state_dict()) if settings.holdout else None
            optimizer = torch.optim.Adam(start_training(qmodel, settings))
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
            if state is not None:  # the moments and the schedule where the last epoch left them
                optimizer.load_state_dict(state["optimizer"])
                schedule.load_state_dict(state["schedule"])
            generator = torch.Generator().manual_seed(seed * 1000 + epoch)
            order = torch.randperm(images.shape[0], generator=generator)
            losses = []
            bar = tqdm(order.split(settings.batch_size), desc=f"{desc} {epoch}/{settings.epochs}",
                       disable=not progress, leave=False)
            for batch in bar:
                optimizer.zero_grad(set_to_none=True)
                # the batch's view (augment): one seed, so that every chunk and rank cuts it alike
                view = int(torch.randint(2 ** 62, (), generator=generator)) if settings.augment else None
                loss = backward_batch(qmodel, fp_model, local, targets, batch, shard, settings, device=device, view=view)
                loss = sum_gradients(optimizer, loss)
                optimizer.step()
                schedule.step()
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4g}")
            finish_training(qmodel)  # what was learnt, folded into the model: what a resumed run starts from
            stopped = False
            if settings.holdout:
                held = [*held, held_out_loss()]
                stopped = held[-1] > min(held[:-1])
                if stopped:  # this epoch made it worse: back to where it started, and no more epochs
                    qmodel.load_state_dict(start)
            state = {"losses": losses, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "held_out": held, "stopped": stopped}
            report[name] = losses
            run.finish(name, qmodel, state)
            if stopped:
                break
    finally:
        finish_training(qmodel)
        for p in qmodel.parameters():  # no gradient buffers left behind (a model's size in memory)
            p.grad = None
        for module, mode in modes:
            module.training = mode
    if held:
        report[f"{desc} held-out"] = held
    return report
