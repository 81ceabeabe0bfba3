"""I&S-ViT accuracy on the shared ViT-Ti: W6/A6, W4/A4, W3/A3 and the W4/A4 ablation.

Runs the `isvit` CLI once per setting (a fresh process each, so peak memory is per setting),
calibrating on imagenet-calib-1000 (the method's default 1024 images, i.e. all 1000; seed 0) and
evaluating on all of imagenet-val-1300. Results are written after every run and a setting
already in the output file is not run again, so an interrupted benchmark resumes.

    python benchmarks/isvit_accuracy.py [--preset fast] [--only w4a4 ...] [--out results/isvit_accuracy.json]

The ablation (W4/A4): post-Softmax quantizer SULQ vs log-sqrt2 vs uniform, without stage 1, without
the reparameterisation (per-tensor post-LayerNorm quantizers from the start), without the outlier
channels' own grid (one grid per tensor, as the paper has it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accuracy import run  # benchmarks/accuracy.py: one CLI run, its JSON back

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

SETTINGS = {
    "w6a6": ["--w-bits", "6", "--a-bits", "6"],
    "w4a4": ["--w-bits", "4", "--a-bits", "4"],
    "w3a3": ["--w-bits", "3", "--a-bits", "3"],
    "w4a4-log2sqrt2": ["--w-bits", "4", "--a-bits", "4", "--softmax-quantizer", "log2sqrt2"],
    "w4a4-uniform-softmax": ["--w-bits", "4", "--a-bits", "4", "--softmax-quantizer", "uniform"],
    "w4a4-no-stage1": ["--w-bits", "4", "--a-bits", "4", "--no-stage1"],
    "w4a4-no-reparam": ["--w-bits", "4", "--a-bits", "4", "--no-reparam"],
    "w4a4-no-outlier-split": ["--w-bits", "4", "--a-bits", "4", "--outlier-ratio", "0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "isvit_accuracy.json"))
    parser.add_argument("--preset", default="fast", choices=["fast", "paper"])
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--limit", type=int, help="evaluate on the first N images only (quick check)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: the CLI's)")
    args = parser.parse_args()

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    common = [
        "quantize", "--method", "isvit", "--preset", args.preset, "--no-fp",
        "--model", "vit_tiny_patch16_224",
        "--weights", str(SHARED / "models" / "vit_tiny_patch16_224.safetensors"),
        "--calib", str(SHARED / "data" / "imagenet-calib-1000"),
        "--data", str(SHARED / "data" / "imagenet-val-1300"),
    ] + (["--limit", str(args.limit)] if args.limit else []) + (["--threads", str(args.threads)] if args.threads else [])
    for name in args.only or list(SETTINGS):
        key = f"{args.preset}/{name}"
        if key in results:
            continue
        results[key] = run(common + SETTINGS[name])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    print("| setting | preset | top-1 | top-5 | calib s | threads | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key.split('/', 1)[1]} | {r['preset']} | {r['top1']:.2f} | {r['top5']:.2f} | "
              f"{r['calib_seconds']:.0f} | {r.get('threads', '-')} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
