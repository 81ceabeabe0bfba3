"""What undoing the rotation at a feature tower's output costs (docs/rotation.md, "What it costs").

A rotated full-precision feature tower (``num_classes=0``, random weights, 224 px, batch 1) is
timed as it is and with its ``Unrotate`` swapped for an Identity, interleaved, on the threads asked
for (1 by default); also the ``Unrotate`` alone on the tokens it gets. Prints one line a model;
writes no file.

    OMP_NUM_THREADS=1 python benchmarks/studies/unrotate_cost.py --models vit_small_patch16_224 vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn

from isvit.modules import Unrotate
from isvit.rotate import rotate_model


def seconds(fn, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return times


def without_unrotate(model: nn.Module) -> nn.Module:
    """The same model with its Unrotate replaced by an Identity (wrong features, the same work but it)."""
    other = copy.deepcopy(model)
    for name, module in list(other.named_modules()):
        if isinstance(module, Unrotate):
            parent, _, attribute = name.rpartition(".")
            setattr(other.get_submodule(parent), attribute, nn.Identity())
    return other


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards of each form, after 3 warm-up ones")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=0).eval()
        rotate_model(model)
        plain = without_unrotate(model)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        unrotate = next(m for m in model.modules() if isinstance(m, Unrotate))
        tokens = model.forward_features(x)
        for fn, inp in ((model, x), (plain, x), (unrotate, tokens)):
            seconds(fn, inp, 3)
        with_times, without_times, alone = [], [], []
        for _ in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits both
            with_times += seconds(model, x, 1)
            without_times += seconds(plain, x, 1)
            alone += seconds(unrotate, tokens, 1)
        full, bare, own = (statistics.median(t) * 1e3 for t in (with_times, without_times, alone))
        print(f"{name}: forward {full:.2f} ms with Unrotate, {bare:.2f} ms without; Unrotate alone on "
              f"{tuple(tokens.shape)} {own:.3f} ms = {100 * own / full:.2f} % of the forward")


if __name__ == "__main__":
    main()
