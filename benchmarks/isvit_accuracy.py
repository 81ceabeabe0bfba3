"""I&S-ViT accuracy on the shared ViT-Ti: W8/A8, W4/A8 (the deployable settings of docs/onnx.md),
W6/A6, W4/A4, W3/A3 and the W4/A4 ablation.

Runs the `isvit` CLI once per setting (a fresh process each, so peak memory is per setting),
calibrating on imagenet-calib-1000 (the method's default 1024 images, i.e. all 1000; seed 0) and
evaluating on all of imagenet-val-1300, with --threads torch threads (default 1; the thread count
changes float rounding and so the trained model: compare rows run with the same count). The output
file holds this invocation's rows only (each with its command line, date and CPU) and is rewritten
after every run.

    python benchmarks/isvit_accuracy.py [--preset fast] [--only w4a4 ...] [--threads 1] [--seed 0] [--calib-size 1024]
        [--qdrop P] [--outlier-ratio R] [--resume-from FILE] [--out results/isvit_accuracy.json]

The options for low bits (``OPTIONS``: w3a3-fisher, w4a4-no-rotate, ...) each add one flag to the
preset at W3/A3 and W4/A4. The ablation (W4/A4): post-Softmax quantizer SULQ vs log-sqrt2 vs uniform, without stage 1, without
the reparameterisation (per-tensor post-LayerNorm quantizers from the start), without the outlier
channels' own grid (one grid per tensor, as the paper has it). --qdrop and --outlier-ratio set
those for every setting (a setting's own flag comes after and wins), e.g. `--qdrop 0
--outlier-ratio 0` for the preset as it was before either.

--resume-from FILE takes the rows of an earlier output whose command line is exactly the one this
run would use instead of running them again; without it every setting asked for is run.
"""

from __future__ import annotations

import argparse

from record import CALIB, MODEL, ROOT, VAL, WEIGHTS, resumable_rows, run_cli, write_json

SETTINGS = {
    "w8a8": ["--w-bits", "8", "--a-bits", "8"],
    "w4a8": ["--w-bits", "4", "--a-bits", "8"],
    "w6a6": ["--w-bits", "6", "--a-bits", "6"],
    "w4a4": ["--w-bits", "4", "--a-bits", "4"],
    "w3a3": ["--w-bits", "3", "--a-bits", "3"],
    "w4a4-log2sqrt2": ["--w-bits", "4", "--a-bits", "4", "--softmax-quantizer", "log2sqrt2"],
    "w4a4-uniform-softmax": ["--w-bits", "4", "--a-bits", "4", "--softmax-quantizer", "uniform"],
    "w4a4-no-stage1": ["--w-bits", "4", "--a-bits", "4", "--no-stage1"],
    "w4a4-no-reparam": ["--w-bits", "4", "--a-bits", "4", "--no-reparam"],
    "w4a4-no-outlier-split": ["--w-bits", "4", "--a-bits", "4", "--outlier-ratio", "0"],
}
# The options for low bits (issue 10), one at a time on top of the preset, at W3/A3 and W4/A4.
# "p999", "no-rotate", "token" and "ste" take away what the fast preset does at <= 4 bits (activation
# percentiles below 0.999, the rotation, the Fisher-weighted loss, learnt rounding offsets); the
# others add one option. "fisher" and "offset" give the preset's own loss and rounding explicitly:
# they measured each before it became the preset's (the same model as the plain setting now). A row
# measures the code of its day: --resume-from matches rows by command line only.
OPTIONS = {
    "p999": ["--act-percentile", "0.999"],
    "no-rotate": ["--no-rotate"],
    "learn-scales": ["--learn-scales", "--scale-lr", "0.05"],
    "offset": ["--rounding", "offset", "--round-lr", "0.03"],
    # the fast preset's own round-lr and round-reg (chosen on one block, unit_probe.py), given
    # explicitly so that the row reruns the same if the preset's change
    "adaround": ["--rounding", "adaround", "--round-lr", "0.3", "--round-reg", "1000"],
    "fisher": ["--loss", "fisher"],
    "token": ["--loss", "token"],
    "ste": ["--rounding", "ste"],
}
for _bits in ("3", "4"):
    for _name, _flags in OPTIONS.items():
        SETTINGS[f"w{_bits}a{_bits}-{_name}"] = ["--w-bits", _bits, "--a-bits", _bits, *_flags]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "isvit_accuracy.json"))
    parser.add_argument("--preset", default="fast", choices=["fast", "paper", "thorough"])
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--limit", type=int, help="evaluate on the first N images only (quick check)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="calibration subset and optimisation seed (default 0)")
    parser.add_argument("--calib-size", type=int, default=1024, help="calibration images (default 1024: all 1000)")
    parser.add_argument("--qdrop", type=float, help="QDrop probability of every setting (default: the preset's)")
    parser.add_argument("--outlier-ratio", type=float, help="outlier ratio of every setting (default: the method's)")
    parser.add_argument("--resume-from", metavar="FILE", help="reuse the rows of FILE run with the same command")
    args = parser.parse_args()
    resume = resumable_rows(args.resume_from)

    common = [
        "quantize", "--method", "isvit", "--preset", args.preset, "--no-fp", "--model", MODEL, "--weights", WEIGHTS,
        "--calib", CALIB, "--calib-size", str(args.calib_size), "--seed", str(args.seed), "--data", VAL, "--batch-size", "64",
        "--threads", str(args.threads),
    ] + (["--limit", str(args.limit)] if args.limit else [])
    common += (["--qdrop", str(args.qdrop)] if args.qdrop is not None else [])
    common += (["--outlier-ratio", str(args.outlier_ratio)] if args.outlier_ratio is not None else [])
    results = {}
    for name in args.only or list(SETTINGS):
        results[f"{args.preset}/{name}"] = run_cli(common + SETTINGS[name], resume)
        write_json(args.out, results)

    print("| setting | preset | top-1 | top-5 | calib s | threads | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key.split('/', 1)[1]} | {r['preset']} | {r['top1']:.2f} | {r['top5']:.2f} | "
              f"{r['calib_seconds']:.0f} | {r['threads']} | {r['peak_rss_mb']:.0f} |")
    print(f"\nJSON in {args.out}")


if __name__ == "__main__":
    main()
