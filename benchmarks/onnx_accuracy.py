"""PyTorch vs onnxruntime and OpenVINO on all of imagenet-val-1300: does the exported model compute
what the quantized PyTorch model computes?

For each setting the shared ViT-Ti is quantized (METHOD:BITS or METHOD:W:A on 32 calibration
images, seed 0) or read from a checkpoint saved by `isvit quantize --save` (`--quantized FILE`),
exported with `isvit.export.export_onnx`, and evaluated on the same decoded images by

- PyTorch (the quantized model itself),
- PyTorch computing what the file computes (`isvit.export.folded_tables`): the export's
  re-expressions (8-bit weights and attention operands on symmetric int8 grids, the post-Softmax
  map on uint8), measured alone,
- onnxruntime with all its graph optimizations (its default: integer kernels where it fuses QDQ),
- onnxruntime with none (every node as written),
- OpenVINO's CPU plugin at f32, and at bf16 where the CPU has it (else the row says it ran f32),
- PyTorch on the images perturbed by 1e-6 (relative, seeded): how much the quantized model itself
  moves under rounding-sized noise, the yardstick for the runtimes.

Reports top-1/top-5 of each, how many predictions equal PyTorch's and the max/mean |logit
difference| to PyTorch; writes JSON and prints a markdown table.

    python benchmarks/onnx_accuracy.py [--settings repq:8 repq:4:8 ...] [--quantized FILE ...] [--limit N]
        [--threads 1] [--jobs 1] [--calib-size 32] [--seed 0] [--out results/onnx_accuracy.json]

Each setting runs in a process of its own (OpenVINO beside torch in one long process crashed it);
--jobs N measures N settings at a time (each decodes the images itself).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch

import isvit
from isvit.checkpoint import load_quantized
from isvit.config import CONFIGS
from isvit.export import export_onnx, folded_tables, load_onnx

from record import CALIB, MODEL, ROOT, VAL, WEIGHTS, environment, write_json


def decode(data_config: dict, limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dataset = isvit.ImageFolderDataset(ROOT / VAL, isvit.build_transform(data_config), limit=limit)
    return [(x.clone(), y.clone()) for x, y in isvit.make_loader(dataset, batch_size=50)]


def logits_of(model, batches) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = torch.cat([model(x) for x, _ in batches])
    return out, time.perf_counter() - start


def perturbed(batches, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(x * (1 + 1e-6 * torch.randn(x.shape, generator=generator)), y) for x, y in batches]


def compare(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    top5 = logits.topk(5, dim=1).indices
    diff = (logits - reference).abs()
    return {
        "top1": 100.0 * (top5[:, 0] == labels).float().mean().item(),
        "top5": 100.0 * (top5 == labels[:, None]).any(dim=1).float().mean().item(),
        "same_prediction": int((logits.argmax(1) == reference.argmax(1)).sum()),
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
    }


def integer_ops(path: Path, threads: int) -> dict[str, int]:
    """Node types of onnxruntime's optimized graph of ``path`` (what its CPU session runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    return dict(collections.Counter(n.op_type for n in nodes).most_common())


def quantized_model(setting: str, data_config: dict, calib_size: int, seed: int):
    """(model, config, source) for 'method:bits' or 'method:w_bits:a_bits' (calibrated here, the
    method's defaults otherwise) or a checkpoint path."""
    if ":" in setting:
        method, *bits = setting.split(":")
        w_bits, a_bits = int(bits[0]), int(bits[-1])
        config = CONFIGS[method](w_bits=w_bits, a_bits=a_bits, calib_size=calib_size, seed=seed)
        fp = isvit.create_model(MODEL, ROOT / WEIGHTS)
        calib = isvit.load_calibration_images(ROOT / CALIB, isvit.build_transform(data_config), calib_size, seed=seed,
                                              progress=False)
        return isvit.quantize(fp, calib, config, progress=False), config, f"{method} on {calib_size} calibration images, seed {seed}"
    model, info = load_quantized(setting)
    return model, info["config"], setting


def run_setting(setting: str, data_config: dict, batches, labels, args, folder: Path) -> dict:
    threads = args.threads
    start = time.perf_counter()
    model, config, source = quantized_model(setting, data_config, args.calib_size, args.seed)
    calib_seconds = time.perf_counter() - start
    path = folder / f"{config.method}_w{config.w_bits}a{config.a_bits}.onnx"
    start = time.perf_counter()
    products = export_onnx(model, path, model_name=MODEL, config=config, data_config=data_config)
    export_seconds = time.perf_counter() - start

    reference, torch_seconds = logits_of(model, batches)
    with folded_tables(model):
        folded, folded_seconds = logits_of(model, batches)
    result = {
        "setting": setting, "source": source, "method": config.method, "w_bits": config.w_bits, "a_bits": config.a_bits,
        "softmax_quantizer": config.softmax_quantizer, "images": len(labels), "onnx_bytes": path.stat().st_size,
        "products": products, "calib_seconds": calib_seconds, "export_seconds": export_seconds,
        "pytorch": {**compare(reference, reference, labels), "seconds": torch_seconds},
        "pytorch_folded": {**compare(folded, reference, labels), "seconds": folded_seconds},
    }
    for name, runtime, options in (("onnxruntime", "onnxruntime", {"optimize": True}),
                                   ("onnxruntime_plain", "onnxruntime", {"optimize": False}),
                                   ("openvino_f32", "openvino", {"precision": "f32"}),
                                   ("openvino_bf16", "openvino", {"precision": "bf16"})):
        session, _ = load_onnx(path, threads=threads, runtime=runtime, **options)
        logits, seconds = logits_of(session, batches)
        result[name] = {**compare(logits, reference, labels), "seconds": seconds, "precision": session.precision}
    logits, seconds = logits_of(model, perturbed(batches))
    result["pytorch_perturbed_1e-6"] = {**compare(logits, reference, labels), "seconds": seconds}
    result["onnxruntime_graph"] = integer_ops(path, threads)
    return result


def print_table(results: list[dict], out: Path) -> None:
    print("| model | W/A | post-Softmax | run by | top-1 | top-5 | same prediction as PyTorch | max / mean abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for key, label in (("pytorch", "PyTorch"), ("pytorch_folded", "PyTorch computing what the file computes (`folded_tables`)"),
                           ("onnxruntime", "onnxruntime (all optimizations)"),
                           ("onnxruntime_plain", "onnxruntime (no optimization)"),
                           ("openvino_f32", "OpenVINO f32"), ("openvino_bf16", "OpenVINO bf16"),
                           ("pytorch_perturbed_1e-6", "PyTorch, image x (1 + 1e-6 noise)")):
            m = r[key]
            if key == "openvino_bf16" and m["precision"] != "bf16":
                label = f"OpenVINO bf16 asked, ran {m['precision']} (no bf16 on this CPU)"
            print(f"| {r['method']} | {r['w_bits']}/{r['a_bits']} | {r['softmax_quantizer']} | {label} | {m['top1']:.2f} | "
                  f"{m['top5']:.2f} | {m['same_prediction']}/{r['images']} | "
                  f"{m['max_abs_logit_diff']:.3f} / {m['mean_abs_logit_diff']:.3f} |")
    print(f"\nJSON in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=["repq:8", "repq:4"],
                        help="METHOD:BITS or METHOD:W:A to quantize here (default repq:8 repq:4)")
    parser.add_argument("--quantized", nargs="*", default=[], help="checkpoints saved by isvit quantize --save")
    parser.add_argument("--limit", type=int, help="the first N images only (quick check)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="settings measured at the same time (default 1)")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration images of METHOD:BITS (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of their calibration subset (default 0)")
    parser.add_argument("--out", default=str(ROOT / "results" / "onnx_accuracy.json"))
    parser.add_argument("--one", metavar="SETTING", help=argparse.SUPPRESS)  # a child process's one setting
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        data_config = isvit.resolve_data_config(isvit.create_model(MODEL, ROOT / WEIGHTS))
        batches = decode(data_config, args.limit)
        labels = torch.cat([y for _, y in batches])
        with tempfile.TemporaryDirectory() as tmp:
            result = run_setting(args.one, data_config, batches, labels, args, Path(tmp))
        Path(args.out).write_text(json.dumps(result))
        return

    # Each setting in a process of its own: OpenVINO's CPU plugin and torch in one long process
    # crashed it (segfault, at the second setting, on an AVX-512 Xeon and an AVX2 EPYC alike).
    settings = [*args.settings, *args.quantized]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(enumerate(settings))
        running = []
        while pending or running:
            while pending and len(running) < args.jobs:
                i, setting = pending.pop(0)
                out = Path(tmp) / f"{i}.json"
                command = [sys.executable, __file__, "--one", setting, "--threads", str(args.threads),
                           "--calib-size", str(args.calib_size), "--seed", str(args.seed), "--out", str(out)]
                if args.limit:
                    command += ["--limit", str(args.limit)]
                print(f"{setting} ...", flush=True)
                running.append((i, setting, out, subprocess.Popen(command)))
            time.sleep(1)
            for entry in [e for e in running if e[3].poll() is not None]:
                running.remove(entry)
                i, setting, out, process = entry
                if process.returncode != 0:
                    sys.exit(f"{setting}: its process ended with exit code {process.returncode}")
                results[i] = json.loads(out.read_text())
    results = [results[i] for i in sorted(results)]
    import openvino

    env = {**environment(args.threads), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
           "openvino": openvino.__version__, "perturbation_seed": 0, "jobs": args.jobs}
    write_json(args.out, {"environment": env, "results": results})
    print_table(results, Path(args.out))


if __name__ == "__main__":
    main()
