"""What the fold is worth with and without the rotation: the error that the post-LayerNorm
activation quantizers (the inputs of each block's qkv and fc1) cause in those Linears' outputs on
real images of the shared ViT-Ti, per-channel grids folded into the LayerNorm (``fold``,
I&S-ViT's stage 2) vs one per-tensor grid (``--no-fold``), with and without the Hadamard
rotation, at 3 and 4 bits (issue 21: the fold is worth 3.8 points at W3/A3 and none at W4/A4).

    python benchmarks/studies/postln_error.py [--bits 3 4] [--threads 1] [--out results/studies/postln_error.json]

For each setting the model is built as isvit builds it before training (the fast preset's
activation grids at that bit-width, fitted in one pass on the first 64 images of
imagenet-calib-1000, then the fold where it applies; rotation seed 0), the weights left in full
precision. On the next 128 images every activation quantizer is off but the one measured, applied
to the input it sees in that otherwise full-precision model: ``out_rel`` = ||W (x^ - x)||^2 /
||W x + b||^2 per Linear (the same output in every setting: rotation and fold are exact).
Means over the 12 blocks in the table; per block in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

import isvit
from isvit.config import IsvitConfig
from isvit.pipeline import set_quantizers
from isvit.rotate import rotate_model
from isvit.wrap import post_layernorm_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where record.py and tune_heldout.py live
from record import MODEL, ROOT, WEIGHTS, environment, first_calib_images, untrained_isvit, write_json  # benchmarks/record.py

FIT_IMAGES, MEASURE_IMAGES, BATCH = 64, 128, 32


def build(fp: torch.nn.Module, bits: int, rotate: bool, fold: bool, fit: torch.Tensor) -> torch.nn.Module:
    """``fp`` as isvit has it before training at W``bits``/A``bits`` (fast preset; its weight grids
    are fitted too, but ``output_errors`` measures with the float weights)."""
    model = copy.deepcopy(fp)
    if rotate:  # rotated here: untrained_isvit refuses a config that rotates, as its block targets
        rotate_model(model, seed=0)  # would be the unrotated model's; this script compares outputs only
    config = IsvitConfig(w_bits=bits, a_bits=bits, preset="fast", rotate=False, fold=fold)
    return untrained_isvit(model, config, fit).eval()


@torch.no_grad()
def output_errors(qmodel: torch.nn.Module, images: torch.Tensor) -> dict[str, list[float]]:
    """{"qkv": [per block], "fc1": [per block]}: ``out_rel`` of each post-LayerNorm input quantizer
    alone, every other quantizer off."""
    set_quantizers(qmodel, False)
    pairs = post_layernorm_pairs(qmodel)
    sums = {name: [0.0, 0.0] for name, _, _ in pairs}

    def hook(name, linear):
        def measure(_module, args):
            x = args[0]
            exact = torch.nn.functional.linear(x, linear.weight, linear.bias)
            error = torch.nn.functional.linear(linear.input_quantizer.quantize(x) - x, linear.weight)
            sums[name][0] += error.double().pow(2).sum().item()
            sums[name][1] += exact.double().pow(2).sum().item()
        return measure

    handles = [linear.register_forward_pre_hook(hook(name, linear)) for name, _, linear in pairs]
    try:
        for start in range(0, len(images), BATCH):
            qmodel(images[start:start + BATCH])
    finally:
        for h in handles:
            h.remove()
    result = {"qkv": [], "fc1": []}
    for name, (err, ref) in sums.items():
        result["qkv" if name.endswith("norm1") else "fc1"].append(err / ref)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "results" / "studies" / "postln_error.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp = isvit.create_model(MODEL, weights=str(ROOT / WEIGHTS))
    images = first_calib_images(fp, FIT_IMAGES + MEASURE_IMAGES, BATCH)
    fit, held = images[:FIT_IMAGES], images[FIT_IMAGES:]

    rows = []
    print("| bits | rotation | post-LayerNorm grids | rel. error of qkv's output | of fc1's output |")
    print("|---|---|---|---|---|")
    for bits in args.bits:
        for rotate in (False, True):
            for fold in (True, False):
                errors = output_errors(build(fp, bits, rotate, fold, fit), held)
                rows.append({"bits": bits, "rotate": rotate, "fold": fold, **errors})
                print(f"| {bits} | {'yes' if rotate else 'no'} | {'per channel, folded' if fold else 'per tensor'} | "
                      f"{statistics.fmean(errors['qkv']):.4f} | {statistics.fmean(errors['fc1']):.4f} |", flush=True)
    write_json(args.out, {"environment": environment(args.threads), "fit_images": FIT_IMAGES,
                          "measure_images": MEASURE_IMAGES, "rows": rows})
    print(f"\nJSON in {args.out}")


if __name__ == "__main__":
    main()
