"""CPU latency of the shared ViT-Ti: PyTorch fp32, onnxruntime fp32 (the unquantized model exported
by isvit) and onnxruntime int8 (the W8/A8 QDQ export, whose matrix products onnxruntime's optimizer
fuses into integer kernels), at batch 1 and 32.

    python benchmarks/int8_latency.py [--threads 2] [--batch-sizes 1 32] [--repeats 50 10]
        [--method {repq,minmax}] [--quantized FILE] [--out results/int8_latency.json]

The W8/A8 model is --method (RepQ-ViT by default, with its log-sqrt2 post-Softmax quantizer; minmax
has a uniform one) on 32 calibration images (seed 0), unless --quantized names a W8/A8
checkpoint. Every runtime gets the same thread count (torch.set_num_threads and onnxruntime's
intra-op threads; inter-op 1). After warm-up the runtimes take turns, one call each, so that a
change of load on the machine hits all of them alike; reported: median and interquartile range of
the calls, in ms. onnxruntime's idle threads do not spin (they would steal the cores from the
runtime whose turn it is). The int8 session is also profiled once (onnxruntime's profiler) to list the
operators that really ran and their share of the time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch

import isvit
from isvit.checkpoint import load_quantized
from isvit.export import export_onnx

from record import CALIB, MODEL, ROOT, WEIGHTS, environment, write_json


def session(path: Path, threads: int, profile_prefix: str | None = None) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # The runtimes take turns: onnxruntime's idle worker threads must not spin on the cores while
    # PyTorch (or the other session) runs, or every other runtime is measured on a busy machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def w8a8_model(args, data_config: dict):
    """(model, config, source): the --quantized checkpoint, or --method calibrated here."""
    if args.quantized:
        model, info = load_quantized(args.quantized)
        config = info["config"]
        if (config.w_bits, config.a_bits) != (8, 8):
            raise SystemExit(f"{args.quantized} is W{config.w_bits}/A{config.a_bits}, not W8/A8")
        return model, config, args.quantized
    config = isvit.QuantConfig(method=args.method, w_bits=8, a_bits=8, calib_size=args.calib_size, seed=args.seed)
    fp = isvit.create_model(MODEL, ROOT / WEIGHTS)
    calib = isvit.load_calibration_images(ROOT / CALIB, isvit.build_transform(data_config), args.calib_size,
                                          seed=args.seed, progress=False)
    source = f"{args.method} on {args.calib_size} calibration images, seed {args.seed}"
    return isvit.quantize(fp, calib, config, progress=False), config, source


def time_calls(runners: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each call, the runners taking turns."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(1000.0 * (time.perf_counter() - start))
    return times


def summary(ms: list[float], batch: int) -> dict:
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "ms_per_image": median / batch,
            "calls": len(ms)}


def profile_ops(path: Path, threads: int, x: torch.Tensor, folder: Path) -> dict:
    """Which operators the int8 session ran (onnxruntime's profiler) and their share of the time."""
    s = session(path, threads, profile_prefix=str(folder / "int8_profile"))
    s.run(["logits"], {"images": x.numpy()})
    events = json.loads(Path(s.end_profiling()).read_text())
    durations, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            durations[e["args"]["op_name"]] += e["dur"]
            counts[e["args"]["op_name"]] += 1
    total = sum(durations.values())
    return {op: {"nodes": counts[op], "time_share": durations[op] / total} for op, _ in durations.most_common()}


def optimized_graph_ops(path: Path, threads: int, folder: Path) -> dict[str, int]:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / f"{path.stem}_optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    return dict(collections.Counter(n.op_type for n in nodes).most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime (default 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, nargs="+", default=[50, 10], help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per runtime and batch size")
    parser.add_argument("--method", choices=["repq", "minmax"], default="repq",
                        help="the W8/A8 model quantized here (default repq; minmax has a uniform post-Softmax grid)")
    parser.add_argument("--calib-size", type=int, default=32, help="its calibration images (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of its calibration subset (default 0)")
    parser.add_argument("--quantized", help="a W8/A8 checkpoint saved by isvit quantize --save instead")
    parser.add_argument("--out", default=str(ROOT / "results" / "int8_latency.json"))
    args = parser.parse_args()
    if len(args.repeats) != len(args.batch_sizes):
        raise SystemExit("give one --repeats count per batch size")
    torch.set_num_threads(args.threads)

    fp = isvit.create_model(MODEL, ROOT / WEIGHTS)
    data_config = isvit.resolve_data_config(fp)
    int8, config, source = w8a8_model(args, data_config)
    env = {**environment(args.threads), "onnxruntime": onnxruntime.__version__}
    before = env["cpu"]
    results = {"environment": env,
               "int8_model": {"method": config.method, "w_bits": config.w_bits, "a_bits": config.a_bits,
                              "softmax_quantizer": config.resolved_softmax_quantizer, "source": source}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp_path, int8_path = folder / "fp32.onnx", folder / "w8a8.onnx"
        export_onnx(fp, fp_path, model_name=MODEL, config=None, data_config=data_config)
        export_onnx(int8, int8_path, model_name=MODEL, config=config, data_config=data_config)
        fp_session, int8_session = session(fp_path, args.threads), session(int8_path, args.threads)

        def pytorch(x):
            with torch.inference_mode():
                return fp(x)

        runners = {
            "pytorch_fp32": pytorch,
            "onnxruntime_fp32": lambda x: fp_session.run(["logits"], {"images": x.numpy()}),
            "onnxruntime_int8": lambda x: int8_session.run(["logits"], {"images": x.numpy()}),
        }
        for batch, repeats in zip(args.batch_sizes, args.repeats):
            x = torch.randn(batch, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
            times = time_calls(runners, x, args.warmup, repeats)
            for name, ms in times.items():
                results["runs"].append({"runtime": name, "batch": batch, **summary(ms, batch), "ms": ms})
            print(f"batch {batch} done", flush=True)
        results["int8_optimized_graph"] = optimized_graph_ops(int8_path, args.threads, folder)
        results["int8_profile"] = profile_ops(int8_path, args.threads, torch.randn(1, *data_config["input_size"]), folder)
    results["environment"]["load_average_after"] = os.getloadavg()

    out = Path(args.out)
    write_json(out, results)
    print(f"| runtime | batch | median ms | IQR ms | ms / image | vs PyTorch fp32 |  ({args.threads} threads)")
    print("|---|---|---|---|---|---|")
    baseline = {r["batch"]: r["median_ms"] for r in results["runs"] if r["runtime"] == "pytorch_fp32"}
    for r in results["runs"]:
        print(f"| {r['runtime']} | {r['batch']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['ms_per_image']:.2f} | "
              f"{baseline[r['batch']] / r['median_ms']:.2f}x |")
    ran = {op: v for op, v in results["int8_profile"].items() if "Integer" in op or "QLinear" in op or "Quantize" in op}
    print("int8 session, integer and quantization operators that ran: "
          + ", ".join(f"{op} x{v['nodes']} ({100 * v['time_share']:.0f}% of the time)" for op, v in ran.items()))
    print(f"load average before {before['load_average']}, after {results['environment']['load_average_after']}; JSON in {out}")


if __name__ == "__main__":
    main()
