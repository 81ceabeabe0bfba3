"""One block of the shared ViT-Ti trained alone with various reconstruction settings: its loss on
calibration images it did not train on. Cheap (minutes), so options are compared here first.

    python benchmarks/studies/unit_probe.py --block 2 --bits 3 --threads 1 \
        --set '{}' --set '{"rounding": "offset", "round_lr": 0.03}' --set '{"iters": 600, "learn_scales": true}'

The model is quantized as isvit does before stage 1 (activation grids on 64 images, the fold, weight
grids) on the calibration part of tune_heldout.py's split of imagenet-calib-1000 (640 images, split
seed 123); the block's full-precision inputs and targets are cached for 512 of them. Each ``--set``
(JSON: ``Reconstruction`` fields over the fast preset's iters=60, batch_size=32, lr=5e-4,
loss=token, qdrop=0.5; a learnt rounding without "round_lr" takes 0.01; the earlier name
"drop_prob" is read as "qdrop") trains the block from the same start on the first 384 images; the
"token" loss is reported on the other 128 before and after, with the mean of the last five training
losses and, for learnt rounding, the share of rounding variables still between 0.05 and 0.95 just
before they are made hard. One JSON line per setting, also appended to --out.

A setting with ``"stage1_iters": N`` (issue 21) first runs stage 1 on the block: N steps with its
activations quantized and its weights float (latent weights, the same lr, loss and batch), before
the fold and the weight grids; ``before`` is then the loss at the start of stage 3 after it. E.g.
the paper preset with and without stage 1, and without it but with its steps in stage 3:

    python benchmarks/studies/unit_probe.py --block 2 --bits 3 \
        --set '{"iters": 1000, "lr": 4e-5, "batch_size": 64, "loss": "mse", "qdrop": 0, "stage1_iters": 1000}' \
        --set '{"iters": 1000, "lr": 4e-5, "batch_size": 64, "loss": "mse", "qdrop": 0}' \
        --set '{"iters": 2000, "lr": 4e-5, "batch_size": 64, "loss": "mse", "qdrop": 0}'

A setting with ``"refit_softmax": true`` (issue 21) fits the block's post-Softmax grids again just
before the training of stage 3, on the block's first 64 inputs as it computes them then (after stage
1, if any, the fold and the weight grids), instead of keeping the grids fitted on the untrained
block with float weights: a trained model's own SULQ grids err more on its maps than grids fitted
to them (benchmarks/studies/softmax_error.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import isvit
from isvit.config import RENAMED, IsvitConfig, Reconstruction
from isvit.modules import QuantMatMul
from isvit.quantizers import UniformQuantizer
from isvit.reconstruct import output_importance, reconstruct_unit, reconstruction_loss, run_unit
from isvit.wrap import forward_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where record.py and tune_heldout.py live
from record import untrained_isvit  # benchmarks/record.py
from tune_heldout import SHARED, heldout_split  # benchmarks/tune_heldout.py

BASE = {"iters": 60, "batch_size": 32, "lr": 5e-4, "loss": "token", "qdrop": 0.5}
# A learnt rounding's learning rate where a setting gives none (the default of the earlier
# ReconstructionSettings, with which the recorded settings ran)
ROUND_LR = 1e-2


def settings_of(extra: dict) -> dict:
    """BASE with one ``--set``'s fields (an earlier name, ``RENAMED``: drop_prob, becomes its new one)."""
    fields = {**BASE, **{RENAMED.get(k, k): v for k, v in extra.items()}}
    if fields.get("rounding", "ste") != "ste":
        fields.setdefault("round_lr", ROUND_LR)
    return fields


def undecided_share(record: list[float]):
    """Wraps UniformQuantizer.finish_learnt_rounding so that each call appends the share of soft
    rounding values still undecided (between 0.05 and 0.95) to ``record``; returns the original."""
    original = UniformQuantizer.finish_learnt_rounding

    def finish(self, weight):
        if self._parameters.get("rounding") is not None and hasattr(self, "soft_rounding"):
            h = self.soft_rounding().detach()
            record.append(((h > 0.05) & (h < 0.95)).float().mean().item())
        return original(self, weight)

    UniformQuantizer.finish_learnt_rounding = finish
    return original


@torch.no_grad()
def refit_softmax_grids(unit, inputs: torch.Tensor) -> None:
    """Fit the post-Softmax quantizers of ``unit`` (each attention's ``av`` left operand) again, in
    one pass over ``inputs``: to its maps as they are now, not as they were when first fitted."""
    for module in unit.modules():
        if isinstance(getattr(module, "av", None), QuantMatMul):
            module.av.a_quantizer.calibrating = True
    unit(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=2, help="transformer block, blocks.N (0-11; default 2)")
    parser.add_argument("--bits", type=int, default=3, help="weight and activation bits (default 3)")
    parser.add_argument("--set", action="append", default=[], dest="settings", help="JSON settings (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/isvit_calib1000.pt", help="decoded images are kept here")
    parser.add_argument("--out", help="append the JSON lines here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = isvit.create_model("vit_tiny_patch16_224", SHARED / "models" / "vit_tiny_patch16_224.safetensors")
    (calib, _), _ = heldout_split(model, args.cache)
    train, check = calib[:384], calib[384:512]
    config = IsvitConfig(w_bits=args.bits, a_bits=args.bits, preset="fast", rotate=False, act_percentile=0.999)
    qmodel = untrained_isvit(model, config, calib[:64])
    fp_units, q_units = forward_units(model), forward_units(qmodel)
    unit_index = args.block + 1  # forward_units: the patch embedding first
    x = torch.cat([train, check])
    for unit in fp_units[:unit_index]:
        x = run_unit(unit, x, "cpu", 64, torch.float32, "cpu")
    inputs, targets = x, run_unit(fp_units[unit_index], x, "cpu", 64, torch.float32, "cpu")
    unit = q_units[unit_index]
    start_state = copy.deepcopy(unit.state_dict())
    importance = None
    record: list[float] = []
    undecided_share(record)
    for text in args.settings or ["{}"]:
        extra = json.loads(text)
        stage1_iters = extra.pop("stage1_iters", 0)
        refit = extra.pop("refit_softmax", False)
        fields = settings_of(extra)
        settings = Reconstruction(**fields)
        if settings.loss == "fisher" and importance is None:
            importance = output_importance(fp_units, train, "cpu", 32, args.seed)[unit_index]
        weight = importance if settings.loss == "fisher" else None
        t0 = time.perf_counter()
        stage1_loss = None
        if stage1_iters:
            def stage1(pre_fold):
                nonlocal stage1_loss
                stage1_settings = dataclasses.replace(settings, iters=stage1_iters, rounding="ste")
                trained = reconstruct_unit(forward_units(pre_fold)[unit_index], inputs[:384], targets[:384],
                                           stage1_settings, "cpu", importance=weight, progress=False)
                stage1_loss = sum(trained[-5:]) / len(trained[-5:])

            unit = forward_units(untrained_isvit(model, config, calib[:64], stage1=stage1))[unit_index]
        else:
            unit = q_units[unit_index]
            unit.load_state_dict(start_state)
        if refit:
            refit_softmax_grids(unit, inputs[:64])
        record.clear()
        before = reconstruction_loss(unit, inputs[384:], targets[384:], "cpu", 64, "token")
        losses = reconstruct_unit(unit, inputs[:384], targets[:384], settings, "cpu", importance=weight, progress=False)
        seconds = time.perf_counter() - t0
        after = reconstruction_loss(unit, inputs[384:], targets[384:], "cpu", 64, "token")
        row = {"block": args.block, "bits": args.bits, "settings": {**fields, "stage1_iters": stage1_iters, "refit_softmax": refit},
               "stage1_train_last": stage1_loss and round(stage1_loss, 3), "before": round(before, 3),
               "after": round(after, 3), "train_last": round(sum(losses[-5:]) / max(1, len(losses[-5:])), 3),
               "undecided": [round(v, 3) for v in record], "seconds": round(seconds, 1), "threads": args.threads,
               "date": datetime.date.today().isoformat()}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
