"""Where does a quantized model fit its calibration images and not others? Each unit's loss on
calibration images beside its loss on held-out images.

    python benchmarks/studies/heldout_blocks.py --set preset=fast,w_bits=3,a_bits=3 --threads 2 \\
        --save /tmp/w3a3.safetensors --note "why"
    python benchmarks/studies/heldout_blocks.py --load /tmp/w3a3.safetensors --threads 2

The block stages run on tune_heldout.py's split of imagenet-calib-1000 (640 calibration images, 360
held out), or a model saved by ``--save`` (an integer checkpoint) is loaded. Then, on as many
calibration images as there are held-out ones and on the held-out images, for every unit (patch
embedding, blocks, head) the "token" loss of reconstruct.py (each token's squared error over its
full-precision variance):

    local:       the quantized unit on the full-precision model's input to it (the unit's own error,
                 what stage 1 trains)
    cumulative:  the quantized model up to and including the unit (what stage 3 trains, and what the
                 next units receive)
    first token: the cumulative loss of the first token alone (ViT's class token: all that a
                 class-token head reads, and where the "fisher" loss puts most of its weight)

and at the output the KL divergence from full precision. A unit whose held-out loss is far above
its calibration loss has fitted its calibration images; one whose local loss is low but cumulative
loss high is hurt by the units before it. One JSON line goes to ``--out``; a table is printed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import isvit
from isvit.checkpoint import load_quantized, save_quantized
from isvit.pipeline import _rotate
from isvit.reconstruct import token_errors
from isvit.wrap import forward_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where tune_heldout.py lives
import tune_heldout  # benchmarks/tune_heldout.py

MODEL = "vit_tiny_patch16_224"


@torch.no_grad()
def unit_losses(qmodel, fp_model, images: torch.Tensor, batch_size: int = 60) -> dict[str, dict[str, float]]:
    """{unit: {"local": loss, "cumulative": loss}} of ``qmodel``'s units against ``fp_model``'s (the
    same architecture, in the same basis) on ``images``, each the mean token loss over all tokens."""
    q_units, fp_units = forward_units(qmodel), forward_units(fp_model)
    sums = {u.name: {"local": 0.0, "cumulative": 0.0, "first_token": 0.0} for u in q_units}
    counts, images_seen = dict.fromkeys(sums, 0), 0
    for start in range(0, len(images), batch_size):
        x_fp = x_q = images[start:start + batch_size]
        for q_unit, fp_unit in zip(q_units, fp_units):
            y_fp = fp_unit(x_fp)
            sums[q_unit.name]["local"] += token_errors(q_unit(x_fp), y_fp, "token").sum().item()
            x_q = q_unit(x_q)
            errors = token_errors(x_q, y_fp, "token")
            sums[q_unit.name]["cumulative"] += errors.sum().item()
            sums[q_unit.name]["first_token"] += errors.reshape(len(errors), -1)[:, 0].sum().item()
            counts[q_unit.name] += y_fp.shape[:-1].numel()
            x_fp = y_fp
        images_seen += len(x_q)
    return {name: {"local": s["local"] / counts[name], "cumulative": s["cumulative"] / counts[name],
                   "first_token": s["first_token"] / images_seen} for name, s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="preset=fast,w_bits=3,a_bits=3", help="the config's fields (tune_heldout.py)")
    parser.add_argument("--load", type=Path, help="an integer checkpoint of a model quantized on this split")
    parser.add_argument("--save", type=Path, help="write the quantized model here (integer checkpoint)")
    parser.add_argument("--out", default="results/studies/heldout_blocks.jsonl")
    tune_heldout.add_split_arguments(parser)
    args = parser.parse_args()
    model, (calib, calib_labels), (held, labels), fp_logits = tune_heldout.open_split(args)
    seconds = None
    if args.load:
        qmodel, info = load_quantized(args.load)
        config = info["config"]
    else:
        config = tune_heldout.config_of(tune_heldout.parse_setting(args.set))
        start = time.perf_counter()
        qmodel = isvit.quantize(model, calib, config, progress=False)
        seconds = round(time.perf_counter() - start, 1)
        if args.save:
            save_quantized(qmodel, args.save, model_name=MODEL, config=config,
                           data_config=isvit.resolve_data_config(model))
    fp_model = copy.deepcopy(model)
    if config.wants_rotation():  # the quantized model's units work in the rotated basis
        _rotate(fp_model, config)
    seen = calib[: len(held)]
    row = {
        "setting": args.set if not args.load else str(args.load),
        "calibration": unit_losses(qmodel, fp_model, seen),
        "held_out": unit_losses(qmodel, fp_model, held),
        "on_calibration": tune_heldout.heldout_scores(qmodel, seen, calib_labels[: len(seen)],
                                                      tune_heldout.logits_of(model, seen)),
        **tune_heldout.heldout_scores(qmodel, held, labels, fp_logits),
        "seconds": seconds, "note": args.note, "config": config.to_dict(),
        "split": f"{len(calib)} calibration / {len(held)} held-out images of imagenet-calib-1000 "
                 f"(split seed {args.split_seed}); losses on the first {len(seen)} calibration images",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
    }
    print(f"{'unit':<12}{'local calib':>12}{'local held':>12}{'cum. calib':>12}{'cum. held':>12}"
          f"{'1st calib':>12}{'1st held':>12}")
    for name in row["calibration"]:
        c, h = row["calibration"][name], row["held_out"][name]
        print(f"{name:<12}" + "".join(f"{d[k]:>12.4g}" for k in ("local", "cumulative", "first_token") for d in (c, h)))
    print(f"KL to full precision: calibration {row['on_calibration']['kl']}, held-out {row['kl']}; held-out top-1 {row['top1']}")
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
