"""Every registered model family, measured (docs/usage.md#supported-models cites the output).

For each variant of tests/family_examples.py (the small random models of the adapter contract,
every parameter redrawn so that each part counts):

- ``w8a8``: minmax and repq at W8/A8 (32 calibration images, 64 others evaluated): the logits'
  mean absolute error relative to their standard deviation, the largest error relative to the
  largest logit, and the share of equal argmax;
- ``fast_w4a4``: the isvit fast preset at W4/A4 (one iteration per unit) runs: finite logits, and
  whether it rotated (or the warning saying why not);

and for each full-size model of ``FULL_SIZE`` (random initialisation, its own image size, two
images): the wrapped model's features (``forward_features``: timm initialises the classifier to
zero) with every quantizer off against the float model's, the surgery's rounding at full size:
largest absolute difference and largest absolute feature. With ``--cli [MODEL ...]``, also the
command line on those full-size models (on every one where no model is named), with their random
weights in a file and eight random images to calibrate on and evaluate: ``isvit quantize`` with
the fast preset at W4/A4 (eight images, two iterations a unit, saved), then ``isvit export`` of the
saved file to ONNX; their wall times.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/families.py --out results/families.json
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import isvit
from isvit.config import CONFIGS
from isvit.families import family_of
from isvit.rotate import is_rotated
from isvit.wrap import Placement, wrap_model

from record import ROOT, environment, run_cli, write_json

sys.path.insert(0, str(ROOT / "tests"))
from family_examples import EXAMPLES  # the contract test's small models (tests/family_examples.py)

# family -> full-size timm models checked once (random initialisation, pretrained=False)
FULL_SIZE = {
    "vit": ["vit_small_patch16_224", "aimv2_large_patch14_224"],
    "swin": ["swin_tiny_patch4_window7_224"],
    "swinv2": ["swinv2_tiny_window8_256"],
    "beit": ["beit_base_patch16_224"],
    "eva": ["eva02_small_patch14_224", "vit_small_patch16_dinov3", "vit_base_patch16_rope_224",
            "vit_small_patch16_rope_mixed_224", "vit_pe_core_small_patch16_384"],
    "naflexvit": ["naflexvit_base_patch16_siglip"],
    "hiera": ["hiera_tiny_224"],
    "hieradet": ["sam2_hiera_tiny"],
}


def w8a8(example, method: str) -> dict:
    model = example.model()
    calib, x = example.images(32, seed=1), example.images(64, seed=2)
    config = CONFIGS[method](w_bits=8, a_bits=8, calib_size=32)
    quantized = isvit.quantize(model, calib, config, progress=False)
    with torch.no_grad():
        fp, q = model(x), quantized(x)
    error = (q - fp).abs()
    return {"relative_mean_error": (error.mean() / fp.std()).item(),
            "relative_max_error": (error.max() / fp.abs().max()).item(),
            "argmax_agreement": (q.argmax(-1) == fp.argmax(-1)).float().mean().item()}


def fast_w4a4(example) -> dict:
    model = example.model()
    config = isvit.IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = isvit.quantize(model, example.images(8, seed=3), config, progress=False)
    with torch.no_grad():
        finite = bool(torch.isfinite(quantized(example.images(4, seed=4))).all())
    told = [str(w.message) for w in caught if "rotation" in str(w.message)]
    return {"finite": finite, "rotated": is_rotated(quantized), "warning": told[0] if told else None}


def full_size(name: str) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(5))
    start = time.perf_counter()
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    isvit.set_quantizers(wrapped, False)
    with torch.no_grad():
        expected, got = model.forward_features(x), wrapped.forward_features(x)
    return {"family": family_of(model).name, "input_size": list(size),
            "parameters_millions": sum(p.numel() for p in model.parameters()) / 1e6,
            "max_abs_difference": (got - expected).abs().max().item(), "max_abs_feature": expected.abs().max().item(),
            "seconds": time.perf_counter() - start}


def image_folder(folder: Path, count: int = 8) -> Path:
    """``count`` random 96x96 PNG images with labels (labels.txt)."""
    generator = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(generator.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png\t{i}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")
    return folder


def command_line(name: str) -> dict:
    """The fast preset's command at W4/A4 on the full-size model ``name`` (random weights), then its export."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "weights.safetensors")
        images = image_folder(tmp)
        start = time.perf_counter()
        run_cli(["quantize", "--model", name, "--weights", tmp / "weights.safetensors", "--calib", images,
                 "--data", images, "--method", "isvit", "--preset", "fast", "--w-bits", "4", "--a-bits", "4",
                 "--calib-size", "8", "--iters", "2", "--threads", "2", "--save", tmp / "q.safetensors"])
        quantize_seconds = time.perf_counter() - start
        start = time.perf_counter()
        export = ["export", "--quantized", str(tmp / "q.safetensors"), "--onnx", str(tmp / "q.onnx"), "--threads", "2"]
        subprocess.run([sys.executable, "-m", "isvit.cli", *export], check=True, stdout=sys.stderr, cwd=ROOT)
        return {"quantize_seconds": quantize_seconds, "export_seconds": time.perf_counter() - start,
                "onnx_megabytes": (tmp / "q.onnx").stat().st_size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--families", nargs="*", help="only these families (default: all)")
    parser.add_argument("--cli", nargs="*", metavar="MODEL",
                        help="also run the command line on these full-size models (all of them without a name)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = args.families or list(EXAMPLES)
    result = {"environment": environment(1), "small": {}, "full_size": {}}
    for family in chosen:
        for variant, example in EXAMPLES[family].items():
            row = {"family": family, "timm_name": example.timm_name, "args": example.args,
                   "w8a8": {method: w8a8(example, method) for method in ("minmax", "repq")},
                   "fast_w4a4": fast_w4a4(example)}
            result["small"][variant] = row
            m = row["w8a8"]["minmax"]
            print(f"{variant:<24} minmax W8/A8 error {m['relative_mean_error']:.4f} of the logits' std, "
                  f"argmax {m['argmax_agreement']:.2f}; fast W4/A4 rotated={row['fast_w4a4']['rotated']}", flush=True)
        for name in FULL_SIZE.get(family, []):
            row = full_size(name)
            if args.cli is not None and (not args.cli or name in args.cli):
                row["command_line"] = command_line(name)
            result["full_size"][name] = row
            print(f"{name:<40} wrap (quantizers off) vs float: max |diff| {row['max_abs_difference']:.2e} "
                  f"of max |feature| {row['max_abs_feature']:.2f}", flush=True)
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
