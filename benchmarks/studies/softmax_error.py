"""The post-Softmax quantizers' error on real attention maps of the shared ViT-Ti: SULQ vs
log-sqrt2 vs uniform at 3 and 4 bits, before and after training (issue 21).

    python benchmarks/studies/softmax_error.py [--bits 3 4] [--trained FILE ...] [--threads 1]
                                               [--out results/studies/softmax_error.json]

Where the maps come from (``source`` in the output):
- "full precision": the full-precision model's own maps (the quantizer alone);
- "untrained WbAb": the maps inside the model as isvit has it before stage 1 at b bits (activation
  grids, the fold, weight grids; not rotated: rotation does not change full-precision maps);
- each ``--trained`` file (a model saved by ``isvit quantize --save``, e.g. by
  ``isvit_accuracy.py --save-dir``): the maps inside that trained model.
For each source and bit-width every quantizer is fitted, as isvit fits it, on the maps of 64
images of imagenet-calib-1000 (``calibrate``), and measured on the maps of 128 others: ``mse``
(mean squared error of the map), ``rel_mse`` (that over the map's mean square) and ``out_rel``, the
error the quantizer alone causes in the attention output, ||(A^ - A) V||^2 / ||A V||^2 with the
model's own V, and ``row_sum``, the mean sum of a row of A^ (1 in full precision; a grid that rounds
the many small probabilities to zero loses their mass); for a trained file also its own quantizer's (``own``), as trained. Means over the 12
blocks in the table; per block in the JSON.

The images: imagenet-calib-1000 in folder order, the first 64 to fit, the next 128 to measure. The
trained models were calibrated on all 1000 of them; an error measured on them is a fit, not a
held-out figure, for those sources.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

import isvit
from isvit.checkpoint import load_quantized
from isvit.config import IsvitConfig
from isvit.families.vit import QuantAttention
from isvit.pipeline import set_quantizers
from isvit.quantizers import SOFTMAX_QUANTIZERS, make_softmax_quantizer
from isvit.wrap import wrap_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where record.py and tune_heldout.py live
from record import MODEL, ROOT, WEIGHTS, environment, first_calib_images, write_json
from record import untrained_isvit  # benchmarks/record.py

FIT_IMAGES, MEASURE_IMAGES, BATCH = 64, 128, 32


def attention_maps(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(post-Softmax map, v) entering each block's ``attn @ v`` for ``images``, in block order."""
    captured = []
    hooks = [m.av.register_forward_pre_hook(lambda _m, args: captured.append((args[0].detach(), args[1].detach())))
             for m in model.modules() if isinstance(m, QuantAttention)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return captured


def errors(quantizer, maps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """mse, rel_mse, out_rel and row_sum (the mean sum of a quantized map's row: 1 in full
    precision; what a grid rounds to zero is lost from it) of ``quantizer`` over ``maps`` (batches
    of one block)."""
    sq_err = sq_map = out_err = out = n = row_sum = rows = 0.0
    with torch.no_grad():
        for a, v in maps:
            quantized = quantizer.quantize(a)
            error = quantized - a
            row_sum += quantized.double().sum().item()
            rows += a.numel() / a.shape[-1]
            sq_err += error.double().pow(2).sum().item()
            sq_map += a.double().pow(2).sum().item()
            n += a.numel()
            out_err += (error @ v).double().pow(2).sum().item()
            out += (a @ v).double().pow(2).sum().item()
    return {"mse": sq_err / n, "rel_mse": sq_err / sq_map, "out_rel": out_err / out, "row_sum": row_sum / rows}


def by_metric(per_block: list[dict[str, float]]) -> dict[str, list[float]]:
    """``errors`` of each block turned into {metric: [per block]}."""
    return {metric: [block[metric] for block in per_block] for metric in per_block[0]}


def measure(model, own_bits: int | None, bits_list: list[int], fit: torch.Tensor, held: torch.Tensor) -> dict:
    """{quantizer: {bits: {metric: [per block]}}} for ``model``'s maps; "own" is the model's own
    post-Softmax quantizer (trained models only, at ``own_bits``)."""
    fit_maps = attention_maps(model, fit)
    held_maps = [[] for _ in fit_maps]
    for start in range(0, len(held), BATCH):
        for block, pair in enumerate(attention_maps(model, held[start:start + BATCH])):
            held_maps[block].append(pair)
    result = {}
    if own_bits is not None:
        own = [m.av.a_quantizer for m in model.modules() if isinstance(m, QuantAttention)]
        result["own"] = {own_bits: by_metric([errors(q, maps) for q, maps in zip(own, held_maps)])}
    for kind in SOFTMAX_QUANTIZERS:
        for bits in bits_list:
            per_block = []
            for (a_fit, _), maps in zip(fit_maps, held_maps):
                q = make_softmax_quantizer(kind, bits)
                q.calibrate(a_fit)
                per_block.append(errors(q, maps))
            result.setdefault(kind, {})[bits] = by_metric(per_block)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--trained", nargs="*", default=[], help="quantized models saved by isvit quantize --save")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "results" / "studies" / "softmax_error.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp = isvit.create_model(MODEL, weights=str(ROOT / WEIGHTS))  # WEIGHTS and CALIB: relative to the repository root
    images = first_calib_images(fp, FIT_IMAGES + MEASURE_IMAGES, BATCH)
    fit, held = images[:FIT_IMAGES], images[FIT_IMAGES:]

    sources = {}
    plain = wrap_model(copy.deepcopy(fp), IsvitConfig(w_bits=8, a_bits=8).placement())
    set_quantizers(plain, False)
    sources["full precision"] = measure(plain.eval(), None, args.bits, fit, held)
    for bits in args.bits:
        config = IsvitConfig(w_bits=bits, a_bits=bits, preset="fast", rotate=False)
        sources[f"untrained W{bits}A{bits}"] = measure(untrained_isvit(fp, config, fit).eval(), None, args.bits, fit, held)
    for path in args.trained:
        model, info = load_quantized(path)
        config = info["config"]
        label = f"{path} ({config.softmax_quantizer}, W{config.w_bits}A{config.a_bits}, seed {config.seed})"
        sources[label] = measure(model, config.a_bits, args.bits, fit, held)

    write_json(args.out, {"environment": environment(args.threads), "fit_images": FIT_IMAGES,
                          "measure_images": MEASURE_IMAGES, "sources": sources})
    print("| maps | quantizer | bits | rel. MSE of the map | rel. error of attn @ v | row sum |")
    print("|---|---|---|---|---|---|")
    for source, by_kind in sources.items():
        for kind, by_bits in by_kind.items():
            for bits, metrics in by_bits.items():
                print(f"| {source} | {kind} | {bits} | {statistics.fmean(metrics['rel_mse']):.4f} | "
                      f"{statistics.fmean(metrics['out_rel']):.4f} | {statistics.fmean(metrics['row_sum']):.3f} |")
    print(f"\nJSON in {args.out}")


if __name__ == "__main__":
    main()
