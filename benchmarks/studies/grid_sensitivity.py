"""How far apart must two held-out measurements be to mean something? The held-out scores of a
quantized model beside those of copies whose activation grids are nudged at random.

    python benchmarks/studies/grid_sensitivity.py --load /tmp/w3a3.safetensors --rel 1e-3 --draws 6 \\
        --threads 1 --note "why"

The model (an integer checkpoint of a model quantized on tune_heldout.py's split, e.g. written by
heldout_blocks.py --save) is scored on the 360 held-out images as it is, then ``--draws`` times
with every calibrated uniform activation quantizer's scale multiplied by 1 + rel * N(0, 1) (one
draw per scale element, from the draw's seed). A change of 0.1% is far below what any setting of
the method changes, so the spread of these scores is the least by which two settings' held-out
scores must differ before the difference says anything about the settings. One JSON line goes to
``--out``: each draw's scores, their mean and standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from isvit.checkpoint import load_quantized
from isvit.quantizers import UniformQuantizer, named_quantizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where tune_heldout.py lives
import tune_heldout  # benchmarks/tune_heldout.py


@torch.no_grad()
def perturbed(qmodel: nn.Module, rel: float, seed: int) -> nn.Module:
    """A copy of ``qmodel`` with each calibrated uniform activation quantizer's scale times
    1 + rel * N(0, 1), drawn per element from ``seed``; weights and other grids unchanged."""
    generator = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(qmodel)
    for _, q in named_quantizers(out, "activation"):
        if isinstance(q, UniformQuantizer) and q.is_calibrated:
            noise = torch.randn(q.scale.shape, generator=generator).to(q.scale.device)
            q.scale = q.scale * (1 + rel * noise)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=Path, required=True, help="an integer checkpoint of a model quantized on this split")
    parser.add_argument("--rel", type=float, default=1e-3, help="relative size of the scales' nudges (default 1e-3)")
    parser.add_argument("--draws", type=int, default=6, help="nudged copies to score (default 6)")
    parser.add_argument("--out", default="results/studies/grid_sensitivity.jsonl")
    tune_heldout.add_split_arguments(parser)
    args = parser.parse_args()
    _, _, (held, labels), fp_logits = tune_heldout.open_split(args)
    qmodel, _ = load_quantized(args.load)
    as_is = tune_heldout.heldout_scores(qmodel, held, labels, fp_logits)
    draws = [tune_heldout.heldout_scores(perturbed(qmodel, args.rel, seed), held, labels, fp_logits)
             for seed in range(args.draws)]
    row = {"setting": str(args.load), "rel": args.rel, "as_is": as_is, "draws": draws,
           **{f"{key}_{stat}": round(fn([d[key] for d in draws]), 4)
              for key in ("kl", "top1") for stat, fn in (("mean", statistics.mean), ("std", statistics.stdev))},
           "note": args.note, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat()}
    print(f"as is: KL {as_is['kl']:.4f}, top-1 {as_is['top1']:.2f}; {args.draws} draws with scales x (1 + {args.rel:g} N(0,1)): "
          f"KL {row['kl_mean']:.4f} ± {row['kl_std']:.4f}, top-1 {row['top1_mean']:.2f} ± {row['top1_std']:.2f}")
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
