"""Does the end-to-end stage (isvit/endtoend.py) pay, and with which settings? Held-out images say.

    python benchmarks/studies/e2e_heldout.py --set preset=fast,w_bits=3,a_bits=3 \\
        --e2e epochs=1 --e2e epochs=2 --e2e epochs=2,lr=3e-4,scale_lr=3e-3 --e2e epochs=2,augment=True \\
        --threads 2 --note "why"

The block stages run once without any end-to-end stage (``--set``, fields as in tune_heldout.py, on tune_heldout.py's split of
imagenet-calib-1000: 640 calibration images, 360 held out); each ``--e2e`` (``EndToEnd`` fields) then
trains a copy of that model end to end on the same calibration images, as ``quantize`` does after
stage 3. One JSON line per setting (the block stages alone first) goes to ``--out``: held-out top-1,
agreement with full precision, KL to it, and the end-to-end stage's seconds.
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
from isvit.checkpoint import load_quantized
from isvit.config import EndToEnd
from isvit.endtoend import train_end_to_end

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where tune_heldout.py lives
import tune_heldout  # benchmarks/tune_heldout.py


def parse_end_to_end(text: str) -> EndToEnd:
    fields = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if value in ("True", "False"):
            fields[key] = value == "True"
            continue
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        fields[key] = value
    return EndToEnd(**fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="preset=fast,w_bits=3,a_bits=3", help="the block stages' config fields")
    parser.add_argument("--e2e", action="append", default=[], help="EndToEnd fields, e.g. epochs=2,lr=1e-4")
    parser.add_argument("--load", type=Path, help="start from this integer checkpoint of the block stages on this split "
                        "(e.g. heldout_blocks.py --save) instead of running them")
    parser.add_argument("--out", default="results/studies/e2e_heldout.jsonl")
    tune_heldout.add_split_arguments(parser)
    args = parser.parse_args()
    model, (calib, _), (held, labels), fp_logits = tune_heldout.open_split(args)
    if args.load:
        blocks, info = load_quantized(args.load)
        config, block_seconds = info["config"], None
    else:
        # the block stages alone (the preset's own end-to-end stage, where it has one, off)
        config = dataclasses.replace(tune_heldout.config_of(tune_heldout.parse_setting(args.set)), end_to_end=EndToEnd())
        start = time.perf_counter()
        blocks = isvit.quantize(model, calib, config, progress=False)
        block_seconds = round(time.perf_counter() - start, 1)
    common = {"setting": str(args.load) if args.load else args.set, "note": args.note, "block_seconds": block_seconds,
              "split": f"{len(calib)} calibration / {len(held)} held-out images of imagenet-calib-1000 "
                       f"(split seed {args.split_seed})", "config": config.to_dict(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    rows = [{"end_to_end": None, "seconds": 0.0, **tune_heldout.heldout_scores(blocks, held, labels, fp_logits)}]
    for text in args.e2e:
        settings = parse_end_to_end(text)
        qmodel = copy.deepcopy(blocks)
        start = time.perf_counter()
        losses = train_end_to_end(qmodel, model, calib, settings, device="cpu", seed=config.seed, progress=False)
        rows.append({"end_to_end": dataclasses.asdict(settings), "seconds": round(time.perf_counter() - start, 1),
                     "epoch_losses": {k: [round(v[0], 4), round(v[-1], 4)] for k, v in losses.items() if "epoch" in k},
                     "kept_images_losses": [round(v, 4) for v in losses.get("end to end held-out", [])],
                     **tune_heldout.heldout_scores(qmodel, held, labels, fp_logits)})
    with open(args.out, "a") as f:
        for row in rows:
            line = json.dumps({**row, **common})
            print(line, flush=True)
            f.write(line + "\n")


if __name__ == "__main__":
    main()
