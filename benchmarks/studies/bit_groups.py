"""Which quantizers cost the accuracy of a *trained* low-bit model? One group raised to 8 bits at a time.

    python benchmarks/studies/bit_groups.py [--bits 3] [--set preset=fast] [--model-cache /tmp/w3a3.safetensors]
                                            [--out results/studies/bit_groups_w3a3.json]

Quantizes the shared ViT-Ti with ``isvit`` at W{bits}/A{bits} (config fields from ``--set``, as in
tune_heldout.py, the fast preset by default) on the calibration part of tune_heldout.py's held-out
split of imagenet-calib-1000 (640 images, split seed 123). Then, for each group of quantizers in
turn, that group alone is raised to 8 bits (weights re-fitted to their trained latent values,
activations re-fitted on 64 calibration images in one pass, everything else left exactly as trained)
and the model is scored on the 360 held-out images: top-1 and the mean KL divergence from full
precision. The first row is the trained model as it is, the last every quantizer at 8 bits. What a
group recovers is what it costs after training. (Switching quantizers *off* says nothing about a
trained model: its weights compensate the quantizers they were trained with.) No evaluation images
are used.

``--per-block``: instead, the error of each transformer block on its own, before any training: the
block's reconstruction loss (the "token" loss: squared error relative to each token's variance,
summed over features) on 128 calibration images with full-precision inputs, with all its
quantizers on and with one group on at a time (the rest full precision). It says where a block's
error comes from before training has co-adapted anything.

``--model-cache FILE``: the trained model is saved there (an integer checkpoint) and loaded from it
on the next run with the same settings, so the table can be redone without retraining.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

import isvit
from isvit.checkpoint import load_quantized, save_quantized
from isvit.quantizers import UniformQuantizer, named_quantizers
from isvit.reconstruct import reconstruction_loss, run_unit
from isvit.wrap import forward_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where record.py and tune_heldout.py live
from quantizer_groups import GROUPS, only, score  # benchmarks/studies/quantizer_groups.py
from record import untrained_isvit  # benchmarks/record.py
from tune_heldout import SHARED, config_of, heldout_split, logits_of, parse_setting  # benchmarks/tune_heldout.py

ROOT = Path(__file__).resolve().parents[2]  # the repository root
MODEL = "vit_tiny_patch16_224"


@torch.no_grad()
def raise_bits(qmodel, pattern: str, bits: int, calib: torch.Tensor) -> list[str]:
    """Re-fit the quantizers whose name matches ``pattern`` at ``bits``, in place; returns their names.

    Weight quantizers are fitted to the layer's (trained) weight. Activation quantizers are fitted in
    one forward pass over ``calib`` with the rest of the model as it is; a grid that the fold made
    per tensor stays per tensor (the folded LayerNorm assumes one scale)."""
    raised = []
    modules = dict(qmodel.named_modules())
    for name, q in named_quantizers(qmodel):
        if re.search(pattern, name) is None or not q.enabled:
            continue
        q.bits = bits
        raised.append(name)
        if name.endswith("weight_quantizer"):
            q.calibrate(modules[name.rsplit(".", 1)[0]].weight.detach())
        else:
            if isinstance(q, UniformQuantizer) and q.per_channel and not q.is_per_channel:
                q.per_channel = False  # folded: keep it per tensor
            q.calibrating = True
    if any(not n.endswith("weight_quantizer") for n in raised):
        qmodel(calib)
    return raised


@torch.no_grad()
def per_block_errors(model, calib, config) -> dict:
    """{block: {group: token loss with only that group quantized}} before training (see the docstring)."""
    qmodel = untrained_isvit(model, config, calib[: config.init_size])
    x = calib[-128:]
    rows = {}
    for fp_unit, q_unit in zip(forward_units(model), forward_units(qmodel)):
        y = run_unit(fp_unit, x, "cpu", 64, torch.float32, "cpu")
        if q_unit.name.startswith(("blocks.", "layers.")):
            row = {}
            for group, pattern in {"all": r".", **GROUPS}.items():
                if only(q_unit, pattern):
                    row[group] = round(reconstruction_loss(q_unit, x, y, "cpu", 64, "token"), 3)
            rows[q_unit.name] = row
            print(q_unit.name, json.dumps(row), flush=True)
        x = y
    return rows


def trained_model(model, calib, config, cache: Path | None):
    if cache is not None and cache.exists():
        qmodel, info = load_quantized(cache)
        if info["config"].to_dict() == config.to_dict():
            print(f"loaded the trained model from {cache}")
            return qmodel, None
        print(f"{cache} holds another configuration: training again")
    start = time.perf_counter()
    qmodel = isvit.quantize(model, calib, config, progress=False)
    seconds = time.perf_counter() - start
    if cache is not None:
        save_quantized(qmodel, cache, model_name=MODEL, config=config, data_config=isvit.resolve_data_config(model))
    return qmodel, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--set", default="preset=fast", help="config fields, as in tune_heldout.py")
    parser.add_argument("--to", type=int, default=8, help="bits a raised group gets (default 8)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--model-cache", type=Path, help="save the trained model here / load it from here")
    parser.add_argument("--per-block", action="store_true", help="each block's error before training, one group at a time")
    parser.add_argument("--cache", default="/tmp/isvit_calib1000.pt", help="decoded images are kept here")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fields = parse_setting(args.set)
    fields.update(w_bits=args.bits, a_bits=args.bits)
    config = config_of(fields)
    model = isvit.create_model(MODEL, SHARED / "models" / f"{MODEL}.safetensors")
    (calib, _), (held, labels) = heldout_split(model, args.cache)
    if args.per_block:
        result = {
            "setting": f"isvit {args.set}, W{args.bits}/A{args.bits}; each block's token loss before training with one "
                       "group of quantizers on (the rest full precision), full-precision inputs, the last 128 of the "
                       "640 calibration images of tune_heldout.py's split (seed 123)",
            "config": config.to_dict(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "blocks": per_block_errors(model, calib, config),
        }
        out = args.out or ROOT / "results" / "studies" / f"bit_groups_w{args.bits}a{args.bits}_per_block.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON in {out}")
        return
    fp_logits = logits_of(model, held)
    trained, seconds = trained_model(model, calib, config, args.model_cache)
    state = trained.state_dict()

    groups = {"none (as trained)": r"(?!)"}
    groups.update(GROUPS)
    groups[f"all at {args.to} bits"] = r"."
    rows = {}
    for group, pattern in groups.items():
        qmodel = trained
        qmodel.load_state_dict(state)
        for _, q in named_quantizers(qmodel):
            q.bits = args.bits
        raised = raise_bits(qmodel, pattern, args.to, calib[:64])
        rows[group] = {"quantizers": len(raised), **score(qmodel, held, labels, fp_logits)}
        print(f"{group:40s} {len(raised):4d} raised  top-1 {rows[group]['top1']:6.2f}  KL {rows[group]['kl']:.3f}",
              flush=True)

    result = {
        "setting": f"isvit {args.set}, W{args.bits}/A{args.bits}; each group raised to {args.to} bits alone; "
                   "640 calibration / 360 held-out images of imagenet-calib-1000 (split seed 123)",
        "config": config.to_dict(),
        "fp_top1": round(100 * (fp_logits.argmax(1) == labels).float().mean().item(), 2),
        "calib_seconds": None if seconds is None else round(seconds, 1),
        "threads": torch.get_num_threads(),
        "groups": rows,
        "torch": torch.__version__,
    }
    out = args.out or ROOT / "results" / "studies" / f"bit_groups_w{args.bits}a{args.bits}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON in {out}")


if __name__ == "__main__":
    main()
