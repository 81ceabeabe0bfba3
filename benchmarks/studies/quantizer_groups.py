"""Which quantizers cost the accuracy? One group switched on at a time, the rest full precision.

    python benchmarks/studies/quantizer_groups.py [--bits 3] [--iters 1] [--outlier-ratio R] [--threads 2] [--seed 0]
        [--out results/studies/quantizer_groups.json]

Quantizes the shared ViT-Ti with `isvit` (W{bits}/A{bits}, fast preset, ``--iters`` reconstruction
iterations per unit: 1 by default, i.e. the quantizers' initialisation with a barely trained model)
on the calibration part of the held-out split of imagenet-calib-1000 used by tune_heldout.py
(640 images, split seed 123), then, for each group of quantizers, switches that group on and every
other quantizer off and scores the model on the 360 held-out images: top-1 and the mean KL
divergence from the full-precision model. The first row has every quantizer off (the reconstructed
weights and the reparameterised LayerNorms alone), the last has all of them on. No evaluation images
are used. Groups: every weight, and the activation quantizers by role (post-LayerNorm qkv/fc1
inputs, proj inputs, fc2 inputs, q and k, post-Softmax, v, head input); with ``--per-block`` also
the fc2 input of each block alone. The JSON records the resolved config (``config.to_dict()``), the command line,
the threads (pinned, default 2) and the machine.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import isvit
from isvit.quantizers import named_quantizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where record.py and tune_heldout.py live
from record import MODEL, ROOT, WEIGHTS, environment, write_json
from tune_heldout import heldout_split, logits_of  # benchmarks/tune_heldout.py

# group -> pattern on the quantizer's name (activation quantizers only, except "weights")
GROUPS = {
    "weights": r"weight_quantizer$",
    "post-LayerNorm (qkv, fc1 inputs)": r"(attn\.qkv|mlp\.fc1)\.input_quantizer$",
    "proj inputs": r"attn\.proj\.input_quantizer$",
    "fc2 inputs (post-GELU)": r"mlp\.fc2\.input_quantizer$",
    "q, k": r"attn\.qk\.[ab]_quantizer$",
    "post-Softmax": r"attn\.av\.a_quantizer$",
    "v": r"attn\.av\.b_quantizer$",
    "head input": r"^head\.input_quantizer$",
}


def score(qmodel, images, labels, fp_logits) -> dict:
    logits = logits_of(qmodel, images)
    kl = F.kl_div(logits.log_softmax(1), fp_logits.log_softmax(1), log_target=True, reduction="batchmean")
    return {"top1": round(100 * (logits.argmax(1) == labels).float().mean().item(), 2), "kl": round(kl.item(), 3)}


def only(qmodel, pattern: str) -> int:
    """Switch on the quantizers whose name matches ``pattern``, every other off; returns how many are on."""
    on = 0
    for name, q in named_quantizers(qmodel):
        q.enabled = re.search(pattern, name) is not None
        on += q.enabled
    return on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--per-block", action="store_true", help="also each block's fc2 input alone")
    parser.add_argument("--cache", default="/tmp/isvit_calib1000.pt", help="decoded images are kept here")
    parser.add_argument("--outlier-ratio", type=float, help="outlier ratio (default: the method's; 0 is one grid per tensor)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="optimisation seed (default 0)")
    parser.add_argument("--out", default=str(ROOT / "results" / "studies" / "quantizer_groups.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = isvit.create_model(MODEL, ROOT / WEIGHTS)
    (calib, _), (held, labels) = heldout_split(model, args.cache)
    fp_logits = logits_of(model, held)
    outlier = {"outlier_ratio": args.outlier_ratio} if args.outlier_ratio is not None else {}
    config = isvit.IsvitConfig.from_preset("fast", w_bits=args.bits, a_bits=args.bits, iters=args.iters, seed=args.seed,
                                           **outlier)
    start = time.perf_counter()
    qmodel = isvit.quantize(model, calib, config, progress=False)
    seconds = time.perf_counter() - start

    groups = {"none": r"(?!)"}  # every quantizer off: what the trained weights alone change
    groups.update(GROUPS)
    if args.per_block:
        groups.update({f"fc2 input, block {i}": rf"^blocks\.{i}\.mlp\.fc2\.input_quantizer$" for i in range(len(model.blocks))})
    groups["all"] = r"."
    rows = {}
    for group, pattern in groups.items():
        count = only(qmodel, pattern)
        rows[group] = {"quantizers": count, **score(qmodel, held, labels, fp_logits)}
        print(f"{group:40s} {count:4d} quantizers  top-1 {rows[group]['top1']:6.2f}  KL {rows[group]['kl']:.3f}", flush=True)

    result = {
        "setting": f"isvit fast W{args.bits}/A{args.bits}, iters={args.iters}, 640 calibration / 360 held-out "
                   "images of imagenet-calib-1000 (split seed 123)",
        "fp_top1": round(100 * (fp_logits.argmax(1) == labels).float().mean().item(), 2),
        "calib_seconds": round(seconds, 1),
        "groups": rows,
        "config": config.to_dict(),
        "environment": environment(args.threads),
    }
    write_json(args.out, result)
    print(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
