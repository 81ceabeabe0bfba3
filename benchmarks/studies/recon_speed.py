"""Seconds per block-iteration of the I&S-ViT reconstruction on the shared ViT-Ti (stage 3, W4/A4).

    python benchmarks/studies/recon_speed.py [--threads 2] [--batch-sizes 64 32] [--iters 10] [--qdrop 0 0.5]
        [--compute-dtypes float32 bfloat16] [--rounding offset] [--out results/studies/recon_speed.json]

Times `reconstruct_unit` on one transformer block with its inputs cached, after warm-up, and
prints the median seconds per iteration (the authors' code: 0.61 s at batch 64 on these 2 cores),
and extrapolates the paper's settings (W4/A4: 1000 iterations at batch 64 for each of the 14 units of
ViT-Ti, in each of the two reconstruction stages; patch embedding and head cost less than a block,
so this is an upper bound on the training time, caching forwards excluded). ``--qdrop`` times each
QDrop probability given (0: none, the paper's; the fast preset's is 0.5) and ``--compute-dtypes``
each compute dtype (bfloat16: under torch.autocast) in the same run. Threads
(default 2) and seeds (calibration subset 0, torch 0) are pinned; the timings, the command line and
the machine go to --out as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import isvit
from isvit.config import IsvitConfig, Reconstruction
from isvit.reconstruct import reconstruct_unit, run_unit
from isvit.wrap import forward_units

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where record.py and tune_heldout.py live
from record import CALIB, MODEL, ROOT, WEIGHTS, environment, untrained_isvit, write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--learn-scales", action="store_true")
    parser.add_argument("--qdrop", type=float, nargs="+", default=[0.0], help="QDrop probabilities to time")
    parser.add_argument("--compute-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="the reconstruction's compute dtypes to time (Reconstruction.compute_dtype)")
    parser.add_argument("--rounding", default="ste", choices=["ste", "offset", "adaround"],
                        help="what stage 3 trains (the fast preset's at <= 4 bits: offset)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=str(ROOT / "results" / "studies" / "recon_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = isvit.create_model(MODEL, ROOT / WEIGHTS)
    transform = isvit.build_transform(isvit.resolve_data_config(model))
    images = isvit.load_calibration_images(ROOT / CALIB, transform, 128, seed=0, progress=False)
    fp = model
    q = untrained_isvit(model, IsvitConfig(w_bits=4, a_bits=4), images[:64])
    units, fp_units = forward_units(q), forward_units(fp)
    x = run_unit(fp_units[0], images, "cpu", 64, torch.float32, "cpu")
    y = run_unit(fp_units[1], x, "cpu", 64, torch.float32, "cpu")
    per_iter, rows = {}, []
    for batch in args.batch_sizes:
        for p in args.qdrop:
            for dtype in args.compute_dtypes:
                times = []
                for _ in range(3):
                    settings = Reconstruction(iters=args.iters, batch_size=batch, lr=4e-5, learn_scales=args.learn_scales,
                                              qdrop=p, compute_dtype=dtype, rounding=args.rounding,
                                              round_lr=None if args.rounding == "ste" else 1e-2)
                    start = time.perf_counter()
                    reconstruct_unit(units[1], x, y, settings, "cpu", progress=False)
                    times.append((time.perf_counter() - start) / args.iters)
                per_iter[batch, p, dtype] = statistics.median(times)
                rows.append({"batch_size": batch, "qdrop": p, "compute_dtype": dtype, "rounding": args.rounding,
                             "seconds_per_iteration": per_iter[batch, p, dtype], "runs": times, "iters": args.iters})
                print(f"batch {batch}, QDrop {p}, {dtype}: {per_iter[batch, p, dtype]:.3f} s per block-iteration "
                      f"(median of 3 x {args.iters}; threads {torch.get_num_threads()})")
    result = {"environment": environment(args.threads), "setting": "stage 3, W4/A4, blocks.0 of ViT-Ti, 128 cached images",
              "learn_scales": args.learn_scales, "rows": rows}
    if (64, 0.0, "float32") in per_iter:
        hours = 2 * len(units) * 1000 * per_iter[64, 0.0, "float32"] / 3600
        result["paper_w4a4_hours"] = hours
        print(f"paper settings, W4/A4 (2 stages x {len(units)} units x 1000 iterations at batch 64): "
              f"about {hours:.1f} h (the authors' code: 0.61 s per iteration, about 4.8 h)")
    write_json(args.out, result)
    print(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
