"""Accuracy and calibration cost of the training-free methods on the shared ViT-Ti.

Runs the `isvit` CLI once per setting (a fresh process each, so that peak memory is per setting):
full precision, then `minmax` and `repq` at W8/A8, W6/A6 and W4/A4 (and W3/A3 with --bits),
both as published (no bias correction) and with the default bias correction, calibrating on
imagenet-calib-1000 and evaluating on all of imagenet-val-1300. Prints a markdown table and
writes every run's JSON into one file.

    python benchmarks/accuracy.py --out results/accuracy.json [--limit N] [--bits 8 6 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Reference top-1 on these files with the peers' own code (shared/docs/data.md): RepQ-ViT's and
# I&S-ViT's (its W6/A6 run with 200 iterations; its W4/A4 and W3/A3 runs were cut after stage 1).
OFFICIAL = {("repq", 6): 79.23, ("repq", 4): 31.00, ("repq", 3): 0.23, ("isvit", 6): 75.15}


def run(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "isvit.cli", *args, "--json", str(out), "--quiet"]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "accuracy.json"))
    parser.add_argument("--limit", type=int, help="evaluate on the first N images only (quick check)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    parser.add_argument("--methods", nargs="+", default=["minmax", "repq"])
    args = parser.parse_args()

    common = [
        "--model", "vit_tiny_patch16_224",
        "--weights", str(SHARED / "models" / "vit_tiny_patch16_224.safetensors"),
        "--data", str(SHARED / "data" / "imagenet-val-1300"),
    ] + (["--limit", str(args.limit)] if args.limit else [])
    results = [run(["eval", *common])]
    for bits in args.bits:
        for method in args.methods:
            for bias_correction in (False, True):
                results.append(run([
                    "quantize", *common, "--calib", str(SHARED / "data" / "imagenet-calib-1000"),
                    "--method", method, "--w-bits", str(bits), "--a-bits", str(bits), "--no-fp",
                    *([] if bias_correction else ["--no-bias-correction"]),
                ]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

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
    print(f"\n{results[0]['images']} images, torch {results[0]['torch']}, timm {results[0]['timm']}; JSON in {out}")


if __name__ == "__main__":
    main()
