"""Accuracy and calibration cost of the training-free methods on the shared ViT-Ti.

Runs the `isvit` CLI once per setting (a fresh process each, so that peak memory is per setting):
full precision, then `minmax` and `repq` at W8/A8, W6/A6 and W4/A4 (and W3/A3 with --bits),
both as published (no bias correction) and with the default bias correction, calibrating on
32 images of imagenet-calib-1000 (seed 0) and evaluating on all of imagenet-val-1300 (batch 64),
with --threads torch threads (default 2). Prints a markdown table and writes every run's JSON
(with its command line, date and CPU) into one file, rewritten after every run.

    python benchmarks/accuracy.py [--out results/accuracy.json] [--limit N] [--bits 8 6 4] [--threads 2]
        [--resume-from FILE]

--resume-from FILE takes the rows of an earlier output whose command line is exactly the one this
run would use (same setting, threads, seed, images) instead of running them again; without it
every row is run.
"""

from __future__ import annotations

import argparse

from record import CALIB, MODEL, ROOT, VAL, WEIGHTS, resumable_rows, run_cli, write_json

# Reference top-1 on these files with the peers' own code (shared/docs/data.md): RepQ-ViT's and
# I&S-ViT's (its W6/A6 run with 200 iterations; its W4/A4 and W3/A3 runs were cut after stage 1).
OFFICIAL = {("repq", 6): 79.23, ("repq", 4): 31.00, ("repq", 3): 0.23, ("isvit", 6): 75.15}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "accuracy.json"))
    parser.add_argument("--limit", type=int, help="evaluate on the first N images only (quick check)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    parser.add_argument("--methods", nargs="+", default=["minmax", "repq"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (default 0)")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration images (default 32)")
    parser.add_argument("--resume-from", metavar="FILE", help="reuse the rows of FILE run with the same command")
    args = parser.parse_args()
    resume = resumable_rows(args.resume_from)

    common = ["--model", MODEL, "--weights", WEIGHTS, "--data", VAL, "--batch-size", "64",
              "--threads", str(args.threads)] + (["--limit", str(args.limit)] if args.limit else [])
    runs = [["eval", *common]]
    for bits in args.bits:
        for method in args.methods:
            for bias_correction in (False, True):
                runs.append([
                    "quantize", *common, "--calib", CALIB, "--calib-size", str(args.calib_size), "--seed", str(args.seed),
                    "--method", method, "--w-bits", str(bits), "--a-bits", str(bits), "--no-fp",
                    *([] if bias_correction else ["--no-bias-correction"]),
                ])
    results = []
    for command in runs:
        results.append(run_cli(command, resume))
        write_json(args.out, results)

    print("| method | W/A | bias corr. | top-1 | top-5 | official code | calib s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["method"] == "fp32":
            print(f"| full precision | 32/32 | - | {r['top1']:.2f} | {r['top5']:.2f} | 82.62 | - | {r['peak_rss_mb']:.0f} |")
            continue
        official = OFFICIAL.get((r["method"], r["w_bits"])) if not r["bias_correction"] else None
        print(
            f"| {r['method']} | {r['w_bits']}/{r['a_bits']} | {'yes' if r['bias_correction'] else 'no'} | "
            f"{r['top1']:.2f} | {r['top5']:.2f} | {official if official is not None else '-'} | "
            f"{r['calib_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    first = results[0]
    print(f"\n{first['images']} images, {args.threads} threads, torch {first['torch']}, timm {first['timm']}, "
          f"{first['cpu']['model']}; JSON in {args.out}")


if __name__ == "__main__":
    main()
