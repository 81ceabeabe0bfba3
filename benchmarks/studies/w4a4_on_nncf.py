"""A study: what the 4-bit post-Softmax code arithmetic costs on NNCF's own INT8 graph.

isvit's W4/A4 file differs from its W4/A8 file by the SULQ code and value arithmetic on every
attention map (``Add eta, Log, Mul, Add, Round, Clip, Mul, Add, Exp, Sub``: export.sulq_operand),
and runs about 0.66x of it on OpenVINO. This inserts the same arithmetic after each Softmax of
NNCF's INT8 ViT-Ti (the model benchmarks/int8_latency.py calibrates and caches with --cache) and
times both, interleaved, at bf16 and f32, batch 1 and 32, 1 thread, so that the slowdown is shown to
be the runtime's cost of that arithmetic on any int8 graph (docs/onnx.md#latency). The grid's
parameters are representative (eta 0.01, 16 levels): the cost does not depend on their values.

    python benchmarks/studies/w4a4_on_nncf.py --nncf int8_cache/vit_tiny_patch16_224_nncf_int8_300img_seed0.xml

Needs the bench extra (OpenVINO). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import collections
import math
import time
from pathlib import Path

import numpy as np

ETA, LEVELS = 0.01, 16
YMIN = math.log2(ETA)
STEP = (math.log2(1 + ETA) - YMIN) / (LEVELS - 1)


def sulq_arithmetic(ops, x):
    """SULQ's code and value on ``x`` (an OpenVINO output), as isvit's file computes them below 8 bits."""
    const = lambda v: ops.constant(np.float32(v))  # noqa: E731
    ln2 = math.log(2.0)
    code = ops.add(ops.multiply(ops.log(ops.add(x, const(ETA))), const(1 / (STEP * ln2))), const(-YMIN / STEP))
    code = ops.clamp(ops.round(code, "half_to_even"), 0.0, float(LEVELS - 1))
    value = ops.exp(ops.add(ops.multiply(code, const(STEP * ln2)), const(YMIN * ln2)))
    return ops.subtract(value, const(ETA))


def with_sulq(core, ops, path: Path):
    """NNCF's model read from ``path``, every Softmax output passed through ``sulq_arithmetic``."""
    model = core.read_model(str(path))
    softmaxes = [op for op in model.get_ordered_ops() if op.get_type_name() == "Softmax"]
    if not softmaxes:
        raise SystemExit(f"{path} has no Softmax to change")
    for op in softmaxes:
        readers = list(op.output(0).get_target_inputs())
        new = sulq_arithmetic(ops, op.output(0))
        for reader in readers:
            reader.replace_source_output(new.output(0))
    return model, len(softmaxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nncf", type=Path, required=True, help="NNCF's INT8 model (.xml), e.g. from int8_latency.py --cache")
    parser.add_argument("--repeats", type=int, nargs=2, default=(40, 6), help="calls per model at batch 1 and 32")
    args = parser.parse_args()
    if not args.nncf.is_file():
        raise SystemExit(f"{args.nncf} does not exist: run benchmarks/int8_latency.py --cache DIR first")
    import openvino as ov
    from openvino import opset13 as ops

    core = ov.Core()
    changed, count = with_sulq(core, ops, args.nncf)
    models = {"nncf_int8": core.read_model(str(args.nncf)), "nncf_int8 + 4-bit SULQ arithmetic": changed}
    print(f"{count} Softmax outputs changed; OpenVINO {ov.__version__.split('-')[0]}, 1 thread")
    print("| precision | batch | model | median ms | vs nncf_int8 |\n|---|---|---|---|---|")
    for precision in ("bf16", "f32"):
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY"}
        compiled = {name: core.compile_model(model, "CPU", config) for name, model in models.items()}
        for batch, repeats in zip((1, 32), args.repeats):
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
            times = collections.defaultdict(list)
            for c in compiled.values():  # warm-up
                c({0: x})
            for _ in range(repeats):  # interleaved: a change of load hits both alike
                for name, c in compiled.items():
                    start = time.perf_counter()
                    c({0: x})
                    times[name].append(time.perf_counter() - start)
            base = np.median(times["nncf_int8"])
            for name in compiled:
                ms = np.median(times[name])
                print(f"| {precision} | {batch} | {name} | {ms * 1e3:.2f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
