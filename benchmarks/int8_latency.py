"""CPU latency of a ViT quantized by isvit against what users pick instead: full precision in
PyTorch, onnxruntime and OpenVINO, NNCF's INT8 model on OpenVINO and onnxruntime's own INT8 model on
onnxruntime; every isvit model (exported to ONNX here) on both onnxruntime and OpenVINO; at batch 1
and 32, with 1 and 2 threads.

    python benchmarks/int8_latency.py [--model {vit_tiny_patch16_224,vit_base_patch16_224}]
        [--quantized FILE [FILE ...]] [--make METHOD:W:A [...]] [--calib-size 32] [--seed 0]
        [--threads 1 2] [--batch-sizes 1 32] [--repeats 50 10] [--warmup 3] [--cache DIR]
        [--nncf-images 300] [--ov-precision {f32,bf16}] [--ov-profile] [--out results/int8_latency.json]

Needs the bench extra (`.venv/bin/pip install -c constraints.txt -e ".[bench]"`: onnxruntime,
OpenVINO and NNCF at the releases measured, openvino 2026.4.1, nncf 3.4.0). The full table, nothing
else running, for the ViT-Ti with isvit at W8/A8, W4/A8 and W4/A4 from checkpoints (10+ minutes each
to make, e.g. `isvit quantize --model vit_tiny_patch16_224 --weights
../shared/models/vit_tiny_patch16_224.safetensors --calib ../shared/data/imagenet-calib-1000 --method
isvit --preset fast --w-bits 4 --a-bits 4 --threads 2 --save isvit_w4a4.safetensors`):

    python benchmarks/int8_latency.py --quantized isvit_w8a8.safetensors isvit_w4a8.safetensors
        isvit_w4a4.safetensors --threads 1 2 --batch-sizes 1 32 --repeats 50 10 --cache int8_cache

and for the ViT-B/16, its isvit models made here:

    python benchmarks/int8_latency.py --model vit_base_patch16_224 --make isvit:8:8 isvit:4:8 isvit:4:4
        --threads 1 2 --batch-sizes 1 8 --repeats 50 10 --cache int8_cache
        --out results/int8_latency_vit_base.json

Models. fp32: --model with the shared weights (the ViT-Ti) or random ones (the ViT-B/16: timm's
initialisation after torch.manual_seed(--seed); latency does not depend on the weights, and the JSON
and the report say "random weights"), exported to ONNX by isvit (config=None); PyTorch runs the
module itself (eager, torch.inference_mode), onnxruntime and OpenVINO the file. nncf_int8:
nncf.quantize(..., model_type=TRANSFORMER, subset_size=N) on the OpenVINO model read from that
file, calibrated on N images (--nncf-images, default 300) of imagenet-calib-1000 drawn with --seed
and preprocessed with the model's timm data config, everything else NNCF's defaults. ort_int8
(onnxruntime only): onnxruntime.quantization.quantize_static on the same images, QDQ, int8 weights
per channel, uint8 activations, MinMax calibration, after quant_pre_process (as quantize_static
asks; the JSON says whether it ran). With --cache DIR both INT8 models are saved there, with their
calibration time, and reused while the fp32 file, N, the seed and the versions are the same.
isvit's models: --quantized FILE ... (checkpoints of --model saved by `isvit quantize --save`;
method, bits and post-Softmax quantizer come from each file's config) and --make METHOD:W:A ...
quantized here on --calib-size images, seed --seed: repq or minmax (seconds each), or isvit at its
fast preset for 1 iteration (the same graph as a trained model, not its accuracy: for a model
without shared weights, whose checkpoints cannot be made here). With neither, the script makes
repq:8:8.

Timing. Every runtime gets the same thread count, and its sessions are built anew for each one:
PyTorch torch.set_num_threads; onnxruntime intra-op threads, inter-op 1, sequential, all graph
optimizations, idle threads not spinning (they would take the cores from the runtime whose turn it
is); OpenVINO INFERENCE_NUM_THREADS, NUM_STREAMS 1, PERFORMANCE_HINT LATENCY, without dynamic
quantization (DYNAMIC_QUANTIZATION_GROUP_SIZE 0, as isvit.load_onnx: isvit.runtime says why). Each
isvit model has two OpenVINO rows: NAME at OpenVINO's own inference precision (on a CPU with native
bf16, AVX-512 BF16 or AMX, it picks bf16), and NAME@f32 at f32; the one isvit.load_onnx picks
(isvit.runtime.quantized_precision: f32 where the post-Softmax codes are float arithmetic, below
8-bit activations) is the model's isvit_openvino_precision in the JSON (null: OpenVINO's default); fp32
and NNCF run at OpenVINO's own. --ov-precision
compiles every model at that precision instead, one row each. The precision each compiled model
actually ran (read back from it; on a CPU without bf16, bf16 gives f32) is a column of the table.
All inputs have a dynamic batch. For each thread count and batch size every model is called
--warmup times, then the models take turns, one call each, --repeats rounds (each round starts at
the next model), so that a change of load on the machine hits all alike. Reported per runtime x
model x batch x threads: median and interquartile range of the calls in ms, ms per image, the
speed ratio to the same runtime's fp32 model in the same run (its median / this median: > 1 is
faster), on OpenVINO the same ratio to NNCF's INT8 model, on onnxruntime to onnxruntime's.

Also recorded, the CPU printed above the table: the CPU (model, cores, AVX2 / AVX-512 / VNNI / BF16
/ AMX flags) and the load average before and after; the versions of torch, onnxruntime, openvino,
nncf; each model's file size (MB = 10^6 bytes); the operator types of onnxruntime's optimized graph
(MatMulIntegerToFloat and QLinearMatMul are integer kernels, MatMul and Gemm float ones); OpenVINO's
layers by type from its runtime model after the calls, each counted by the precision OpenVINO gives
its data and the kernel that ran ("u8 jit_gemm_I8": an integer product; "u8 brgemm_avx2_f32": int8
weights decompressed into a float product); onnxruntime's per-operator time share in one profiled
batch-1 call of each INT8 model but NNCF's; with --ov-profile, OpenVINO's per-layer-type time and
kernels (PERF_COUNT, in a separate untimed compile). The ViT-Ti table takes 20+ minutes on 2 cores,
the ViT-B's longer; run them with nothing else on the machine and compare rows of one run only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import timm
import torch

import isvit
from isvit.checkpoint import load_quantized
from isvit.config import CONFIGS, Config
from isvit.export import export_onnx
from isvit.runtime import exact_openvino_config, quantized_precision

from record import CALIB, MODEL, ROOT, WEIGHTS, environment, write_json

FP32 = "fp32"
NNCF = "nncf_int8"
ORT_INT8 = "ort_int8"
# The models compared: the shared ViT-Ti with its weights, and ViT-B/16 with random ones (latency
# does not depend on the weights, and there is no shared ViT-B checkpoint).
MODELS = (MODEL, "vit_base_patch16_224")
SHARED_WEIGHTS = {MODEL: WEIGHTS}
# Quick enough to quantize here: repq and minmax as they are, isvit at 1 iteration of the fast
# preset (the graph of a trained isvit model, not its accuracy; a trained one comes as a file).
MADE_METHODS = ("repq", "minmax", "isvit")
# Each isvit model's second OpenVINO row, compiled at f32 (the first: OpenVINO's default), is named
# after it, e.g. isvit_w4a8@f32; which of the two isvit's load_onnx picks is in each model's JSON.
SECOND_PRECISION = "f32"
# The layer types of OpenVINO's runtime model that hold the products ("Subgraph": fused float
# element-wise chains or attention, whose MatMuls then no longer appear as MatMul layers).
OV_PRODUCTS = ("FullyConnected", "MatMul", "Convolution", "Subgraph")
# onnxruntime's float and integer products, printed under the table (the JSON has every op type).
ORT_PRODUCTS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger",
                "QLinearConv", "ConvInteger", "MatMul", "FusedMatMul", "Gemm", "Conv")


def say(message: str) -> None:
    """Progress on stderr: stdout is for the table."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def make_spec(text: str) -> tuple[str, int, int]:
    """``--make`` item METHOD:W:A, e.g. repq:4:8, as (method, w_bits, a_bits)."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not METHOD:W:A, e.g. repq:4:8")
    if parts[0] not in MADE_METHODS:
        raise argparse.ArgumentTypeError(f"{parts[0]!r}: --make quantizes {', '.join(MADE_METHODS)} only")
    return parts[0], int(parts[1]), int(parts[2])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default=MODEL,
                        help=f"the ViT compared (default {MODEL}; {MODELS[1]} has random weights)")
    parser.add_argument("--quantized", nargs="+", default=[], metavar="FILE",
                        help="checkpoints of --model saved by isvit quantize --save, each run on onnxruntime "
                             "and OpenVINO")
    parser.add_argument("--make", nargs="+", type=make_spec, default=[], metavar="METHOD:W:A",
                        help="repq, minmax or isvit (fast preset, 1 iteration) models quantized here, e.g. "
                             "repq:8:8 isvit:4:8 (default: repq:8:8 when no --quantized file is given)")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration images of --make models (default 32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the calibration subsets and of the random input (default 0)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, nargs="+", default=[50, 10], help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model, batch size and thread count")
    parser.add_argument("--cache", metavar="DIR",
                        help="keep NNCF's and onnxruntime's INT8 models here and reuse them in later runs")
    parser.add_argument("--nncf-images", type=int, default=300,
                        help="NNCF's and onnxruntime's INT8 calibration images, NNCF's subset_size (default 300; "
                             "fewer only to try the script)")
    parser.add_argument("--ov-precision", choices=["f32", "bf16"],
                        help="OpenVINO's INFERENCE_PRECISION_HINT for every model, one row each (default: "
                             "OpenVINO's own choice, and isvit's models also at isvit's, two rows)")
    parser.add_argument("--ov-profile", action="store_true",
                        help="also OpenVINO's per-layer-type time (PERF_COUNT, a separate untimed compile)")
    parser.add_argument("--out", default=str(ROOT / "results" / "int8_latency.json"))
    args = parser.parse_args(argv)
    if len(args.repeats) != len(args.batch_sizes):
        parser.error("give one --repeats count per batch size")
    if min(args.threads + args.batch_sizes + args.repeats) < 1 or args.nncf_images < 1 or args.calib_size < 1:
        parser.error("thread counts, batch sizes, repeats and image counts must be positive")
    for path in args.quantized:
        if not Path(path).is_file():
            parser.error(f"--quantized: {path} does not exist")
    if not args.quantized and not args.make:
        args.make = [("repq", 8, 8)]
    return args


# ---------------------------------------------------------------------------------------------
# The models: fp32 export, NNCF's INT8 model, isvit's models exported to ONNX
# ---------------------------------------------------------------------------------------------

def fp32_model(name: str, seed: int) -> tuple[torch.nn.Module, str]:
    """The full-precision model and where its weights come from: the shared file, or (for a model
    without one) timm's random initialisation after torch.manual_seed(seed)."""
    if name in SHARED_WEIGHTS:
        return isvit.create_model(name, ROOT / SHARED_WEIGHTS[name]), str(SHARED_WEIGHTS[name])
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    return model, f"random weights (timm's initialisation, torch seed {seed}): latency does not depend on them"


def file_mb(*paths: Path) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached(file: Path, wanted: dict) -> dict | None:
    """What made the cached model ``file`` (its sidecar JSON), if it was made with ``wanted``."""
    sidecar = file.with_suffix(".json")
    if file.is_file() and sidecar.is_file():
        made = json.loads(sidecar.read_text())
        if {key: made.get(key) for key in wanted} == wanted:
            return made
    return None


def reuse(label: str, file: Path, wanted: dict) -> tuple[Path, dict] | None:
    """(the cached model ``file``, what made it) where it was made with ``wanted`` (``cached``), else None."""
    made = cached(file, wanted)
    if not made:
        return None
    say(f"{label}: reusing {file} (calibrated in {made['calibration_s']:.0f} s)")
    return file, {**made, "cached": True, "file": str(file)}


def int8_calibration_images(label: str, calib_folder: Path, transform, images: int, seed: int) -> list[np.ndarray]:
    """The images NNCF and onnxruntime calibrate their INT8 models on, each a batch of one."""
    say(f"{label}: loading {images} calibration images (seed {seed})")
    calib = isvit.load_calibration_images(calib_folder, transform, images, seed=seed, progress=False)
    return [image[None].numpy() for image in calib]


def nncf_int8(fp32_path: Path, model: str, folder: Path, calib_folder: Path, transform, images: int,
              seed: int) -> tuple[Path, dict]:
    """NNCF's INT8 model of the fp32 ONNX file, as an OpenVINO IR in ``folder`` (reused when the
    file there was made from the same fp32 file with the same settings and versions), and what
    made it."""
    import nncf  # imported here: it takes seconds, and the test suite imports this module without it
    import openvino

    xml = folder / f"{model}_nncf_int8_{images}img_seed{seed}.xml"
    wanted = {"fp32_onnx_sha256": sha256(fp32_path), "images": images, "subset_size": images, "seed": seed,
              "model_type": "TRANSFORMER", "nncf": nncf.__version__, "openvino": openvino.__version__}
    reused = reuse("NNCF INT8 model", xml, wanted)
    if reused:
        return reused
    calib = int8_calibration_images("NNCF INT8 model", calib_folder, transform, images, seed)
    say(f"NNCF INT8 model: nncf.quantize on {images} images (1-2 minutes at 300 for the ViT-Ti)")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is for the table
        quantized = nncf.quantize(openvino.Core().read_model(str(fp32_path)), nncf.Dataset(calib),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=images)
    made = {**wanted, "calibration_s": time.perf_counter() - start}
    folder.mkdir(parents=True, exist_ok=True)
    openvino.save_model(quantized, str(xml))
    write_json(xml.with_suffix(".json"), made)
    return xml, {**made, "cached": False, "file": str(xml)}


class ImageFeed:
    """onnxruntime's CalibrationDataReader: the next input of the calibration, None at the end."""

    def __init__(self, images: list[np.ndarray]):
        self.inputs = iter([{"images": image} for image in images])

    def get_next(self) -> dict | None:
        return next(self.inputs, None)


def ort_int8(fp32_path: Path, model: str, folder: Path, calib_folder: Path, transform, images: int,
             seed: int) -> tuple[Path, dict]:
    """onnxruntime's own static INT8 model of the fp32 ONNX file (QDQ, int8 weights per channel,
    uint8 activations, MinMax calibration on the images NNCF gets), as an ONNX file in ``folder``
    (reused as NNCF's model is), and what made it. quant_pre_process (symbolic shape inference and
    onnxruntime's basic optimizations) runs first, as quantize_static asks; if it fails, the fp32
    file is quantized as it is, and the JSON says so."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    path = folder / f"{model}_ort_int8_{images}img_seed{seed}.onnx"
    settings = {"quant_format": "QDQ", "per_channel": True, "weight_type": "QInt8", "activation_type": "QUInt8",
                "reduce_range": False, "calibrate_method": "MinMax"}
    wanted = {"fp32_onnx_sha256": sha256(fp32_path), "images": images, "seed": seed, **settings,
              "onnxruntime": onnxruntime.__version__}
    reused = reuse("onnxruntime INT8 model", path, wanted)
    if reused:
        return reused
    calib = int8_calibration_images("onnxruntime INT8 model", calib_folder, transform, images, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source, pre_process_error = Path(tmp) / "pre_processed.onnx", None
        try:
            quant_pre_process(str(fp32_path), str(source))
        except Exception as exc:  # symbolic shape inference cannot follow every graph
            source, pre_process_error = fp32_path, f"{type(exc).__name__}: {exc}"
            say(f"onnxruntime INT8 model: quant_pre_process failed ({pre_process_error}); quantizing the fp32 file")
        say(f"onnxruntime INT8 model: quantize_static on {images} images")
        start = time.perf_counter()
        # Written beside the cache file and renamed into place: never half a model under its name.
        quantize_static(str(source), str(Path(tmp) / path.name), ImageFeed(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
        made = {**wanted, "quant_pre_process": pre_process_error is None, "quant_pre_process_error": pre_process_error,
                "calibration_s": time.perf_counter() - start}
        os.replace(Path(tmp) / path.name, path)
    write_json(path.with_suffix(".json"), made)
    return path, {**made, "cached": False, "file": str(path)}


def describe(config: Config, source: str, lowered: dict) -> dict:
    """What an isvit model is, for the JSON: method, bits, post-Softmax quantizer, where it came from."""
    return {"method": config.method, "w_bits": config.w_bits, "a_bits": config.a_bits,
            "softmax_quantizer": config.softmax_quantizer, "source": source, "quantizers_lowered": lowered}


def export_checkpoint(checkpoint: Path, model: str, out: Path) -> dict:
    """The checkpoint's model (which must be ``model``), exported to ONNX at ``out``; returns what it is."""
    quantized, info = load_quantized(checkpoint)
    if info["model"] != model:
        raise SystemExit(f"{checkpoint} holds a {info['model']}, not the {model} this run compares with (--model)")
    lowered = export_onnx(quantized, out, model_name=info["model"], config=info["config"],
                          data_config=info["data_config"], model_args=info["model_args"])
    return describe(info["config"], str(checkpoint), lowered)


def made_config(spec: tuple[str, int, int], calib_size: int, seed: int) -> tuple[Config, str]:
    """The config of a ``--make`` model and how the JSON describes it."""
    method, w_bits, a_bits = spec
    if method == "isvit":
        config = isvit.IsvitConfig.from_preset("fast", w_bits=w_bits, a_bits=a_bits, iters=1, calib_size=calib_size,
                                                seed=seed)
        return config, (f"this script: fast preset, 1 iteration, {calib_size} images, seed {seed}: the same graph "
                        "as a trained model, not its accuracy")
    config = CONFIGS[method](w_bits=w_bits, a_bits=a_bits, calib_size=calib_size, seed=seed)
    return config, f"{method} quantized by this script on {calib_size} calibration images, seed {seed}"


def export_made(fp: torch.nn.Module, model: str, spec: tuple[str, int, int], calib: torch.Tensor, seed: int,
                data_config: dict, out: Path) -> dict:
    """``fp`` (the model ``model``) quantized here as ``spec`` (method, w_bits, a_bits), exported to
    ONNX at ``out``."""
    config, source = made_config(spec, len(calib), seed)
    quantized = isvit.quantize(fp, calib, config, progress=False)
    lowered = export_onnx(quantized, out, model_name=model, config=config, data_config=data_config)
    return describe(config, source, lowered)


def model_name(description: dict, taken: set[str]) -> str:
    """A short unique name for an isvit model: repq_w4a8, isvit_w4a4, then isvit_w4a4_2, ..."""
    base = f"{description['method']}_w{description['w_bits']}a{description['a_bits']}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


# ---------------------------------------------------------------------------------------------
# The runtimes
# ---------------------------------------------------------------------------------------------

def ort_session(path: Path, threads: int, *, profile_prefix: str | None = None,
                optimized_path: Path | None = None) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # The runtimes take turns: onnxruntime's idle worker threads must not spin on the cores while
    # another runtime runs, or every other runtime is measured on a busy machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ov_compile(core, path: Path, threads: int, precision: str | None, perf_count: bool = False):
    """``path`` (ONNX or OpenVINO IR) compiled for the CPU with ``threads`` threads, one stream."""
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              **exact_openvino_config(core)}  # as isvit's load_onnx: no second quantization of activations
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if perf_count:
        config["PERF_COUNT"] = True
    return core.compile_model(str(path), "CPU", config)


def ov_settings(compiled) -> dict:
    """What OpenVINO made of the compile settings: the precision it computes in, threads, streams."""
    return {"inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "threads": compiled.get_property("INFERENCE_NUM_THREADS"),
            "streams": compiled.get_property("NUM_STREAMS"),
            "cpu_pinning": compiled.get_property("ENABLE_CPU_PINNING")}


def ov_layers(compiled) -> dict[str, dict[str, int]]:
    """The layers of OpenVINO's runtime model by type, counted by "PRECISION KERNEL" from each
    layer's rt_info: runtimePrecision, the precision OpenVINO gives the layer's data, and
    primitiveType, the kernel, whose suffix is the precision it computes in. Both are needed: a
    FullyConnected with int8 weights can be "u8 brgemm_avx2_f32" (weights decompressed, float
    product) or "u8 jit_gemm_I8" (an integer product). Read after a call: before one, a dynamic
    shape's kernel is "undef". Constants left out."""
    counts = collections.defaultdict(collections.Counter)
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer != "Const":
            counts[layer][f"{info['runtimePrecision'].astype(str)} {info['primitiveType'].astype(str)}"] += 1
    return {layer: dict(counts[layer]) for layer in sorted(counts)}


def pytorch_runner(model: torch.nn.Module) -> Callable[[torch.Tensor], object]:
    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def ort_runner(session) -> Callable[[torch.Tensor], object]:
    return lambda x: session.run(["logits"], {"images": x.numpy()})


def ov_runner(compiled) -> Callable[[torch.Tensor], object]:
    request = compiled.create_infer_request()
    # share_inputs: OpenVINO reads the array in place, as onnxruntime does, instead of copying it.
    return lambda x: request.infer({0: x.numpy()}, share_inputs=True)


def openvino_models(paths: dict[str, Path], isvit_models: list[str],
                    forced: str | None) -> dict[str, tuple[Path, str | None]]:
    """OpenVINO's rows: by name, the file and the INFERENCE_PRECISION_HINT it is compiled with
    (None: OpenVINO's default). Every model at ``forced`` where --ov-precision gives one; otherwise
    every model at OpenVINO's default, and each of isvit's models once more at the precision
    isvit's load_onnx gives a quantized file, named NAME@PRECISION."""
    rows = {name: (path, forced) for name, path in paths.items()}
    if forced is None:
        for name in isvit_models:
            rows[f"{name}@{SECOND_PRECISION}"] = (paths[name], SECOND_PRECISION)
    return rows


def build_runners(fp: torch.nn.Module, onnx_paths: dict[str, Path], ov_models: dict[str, tuple[Path, str | None]],
                  core, threads: int) -> tuple[dict, dict]:
    """What is timed at one thread count, by (runtime, model): PyTorch's fp32 model, each ONNX file
    in an onnxruntime session, each of ``ov_models`` (``openvino_models``) compiled by OpenVINO;
    and the compiled models."""
    runners = {("pytorch", FP32): pytorch_runner(fp)}
    for name, path in onnx_paths.items():
        runners[("onnxruntime", name)] = ort_runner(ort_session(path, threads))
    compiled = {name: ov_compile(core, path, threads, precision) for name, (path, precision) in ov_models.items()}
    for name, c in compiled.items():
        runners[("openvino", name)] = ov_runner(c)
    return runners, compiled


# ---------------------------------------------------------------------------------------------
# Timing and its summary
# ---------------------------------------------------------------------------------------------

def time_interleaved(runners: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[tuple, list[float]]:
    """Milliseconds of each call of each runner, the runners taking turns one call each."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    names = list(runners)
    times = {name: [] for name in names}
    for i in range(repeats):
        # Each round starts at the next runner: no model always follows the same one.
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            runners[name](x)
            times[name].append(1000.0 * (time.perf_counter() - start))
    return times


def summarize(times: dict[tuple[str, str], list[float]], batch: int, threads: int,
              ov_precisions: dict[str, str] | None = None) -> list[dict]:
    """One row per (runtime, model) of one batch size and thread count: median, quartiles, ms per
    image, the speed ratios (the reference's median / this median) to the same runtime's fp32
    model, to NNCF's INT8 model and to onnxruntime's INT8 model (None where the runtime has no such
    model in ``times``), and on OpenVINO the precision the model was compiled for (``ov_precisions``,
    by model name: INFERENCE_PRECISION_HINT read back from the compiled model; None elsewhere)."""
    ov_precisions = ov_precisions or {}
    medians = {key: float(np.median(ms)) for key, ms in times.items()}
    rows = []
    for (runtime, model), ms in times.items():
        q1, median, q3 = (float(q) for q in np.percentile(ms, [25, 50, 75]))
        fp32, nncf_int8, ort_int8 = (medians.get((runtime, name)) for name in (FP32, NNCF, ORT_INT8))
        rows.append({"runtime": runtime, "model": model, "batch": batch, "threads": threads,
                     "ov_precision": ov_precisions.get(model) if runtime == "openvino" else None,
                     "median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "ms_per_image": median / batch,
                     "calls": len(ms), "vs_fp32": fp32 / median if fp32 else None,
                     "vs_nncf_int8": nncf_int8 / median if nncf_int8 else None,
                     "vs_ort_int8": ort_int8 / median if ort_int8 else None, "ms": ms})
    return rows


def markdown_table(rows: list[dict]) -> str:
    def ratio(value):
        return "" if value is None else f"{value:.2f}x"

    header = ("| runtime | model | OpenVINO precision | batch | threads | median ms | IQR ms | ms / image | "
              "vs own fp32 | vs NNCF int8 | vs onnxruntime int8 |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['model']} | {r['ov_precision'] or ''} | {r['batch']} | "
                     f"{r['threads']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['ms_per_image']:.2f} | "
                     f"{ratio(r['vs_fp32'])} | {ratio(r['vs_nncf_int8'])} | {ratio(r['vs_ort_int8'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# What ran: onnxruntime's optimized graph and profile, OpenVINO's per-layer times
# ---------------------------------------------------------------------------------------------

def ort_graph_ops(path: Path, threads: int, folder: Path) -> dict[str, int]:
    """The operator types of onnxruntime's optimized graph (the kernels it really runs), by count."""
    optimized = folder / f"{path.stem}_optimized.onnx"
    ort_session(path, threads, optimized_path=optimized)
    nodes = onnx.load(str(optimized)).graph.node
    return dict(collections.Counter(n.op_type for n in nodes).most_common())


def ort_profile(path: Path, threads: int, x: torch.Tensor, folder: Path) -> dict:
    """The operators of one onnxruntime call (its profiler) and their share of the time."""
    session = ort_session(path, threads, profile_prefix=str(folder / f"{path.stem}_profile"))
    session.run(["logits"], {"images": x.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    durations, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            durations[e["args"]["op_name"]] += e["dur"]
            counts[e["args"]["op_name"]] += 1
    total = sum(durations.values())
    return {op: {"nodes": counts[op], "time_share": durations[op] / total} for op, _ in durations.most_common()}


def ov_profile(core, path: Path, threads: int, precision: str | None, x: torch.Tensor, calls: int = 5) -> dict:
    """OpenVINO's time per layer type over ``calls`` calls (PERF_COUNT), with the kernels it chose."""
    request = ov_compile(core, path, threads, precision, perf_count=True).create_infer_request()
    request.infer({0: x.numpy()})  # the first call also allocates: not counted
    durations, counts, kernels = collections.Counter(), collections.Counter(), collections.defaultdict(set)
    for _ in range(calls):
        request.infer({0: x.numpy()})
        for layer in request.profiling_info:
            if layer.status == layer.Status.EXECUTED:
                durations[layer.node_type] += layer.real_time.total_seconds()
                counts[layer.node_type] += 1
                kernels[layer.node_type].add(layer.exec_type)
    total = sum(durations.values())
    return {t: {"nodes": counts[t] // calls, "time_share": durations[t] / total, "kernels": sorted(kernels[t])}
            for t, _ in durations.most_common()}


def kernel_summary(name: str, model: dict) -> str:
    """One line under the table: a model's products on each runtime ("not run": NNCF's model and the
    second OpenVINO row of an isvit model run on OpenVINO only, onnxruntime's INT8 model on onnxruntime)."""
    ort, ov = "not run", "not run"
    if "onnxruntime_ops" in model:
        ort_ops = model["onnxruntime_ops"]
        ort = ", ".join(f"{op} {ort_ops[op]}" for op in ORT_PRODUCTS if op in ort_ops) or "-"
    if "openvino_layers" in model:
        layers = model["openvino_layers"]
        ov = ", ".join(f"{layer} " + " + ".join(f"{n} {kind}" for kind, n in layers[layer].items())
                       for layer in OV_PRODUCTS if layer in layers) or "-"
    return f"- {name} ({model['file_mb']:.1f} MB): onnxruntime {ort}; openvino {ov}"


def cpu_line(cpu: dict) -> str:
    """The CPU and the instruction sets that decide the kernels, for the head of the report."""
    flags = ", ".join(f"{flag} {'yes' if cpu[flag] else 'no'}"
                      for flag in ("avx2", "avx512f", "vnni", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                   "amx_int8"))
    return f"CPU: {cpu['model']}, {cpu['cores']} cores; {flags}"


def print_report(results: dict) -> None:
    """The CPU and the model above the table, then each model's kernels, OpenVINO's precision, the
    INT8 baselines' calibration, the profiles and the load."""
    models, env = results["models"], results["environment"]
    print(cpu_line(env["cpu"]))
    print(f"Model: {results['settings']['model']}, {models[FP32]['source']}")
    print()
    print(markdown_table(results["runs"]))
    print()
    for name, model in models.items():
        what = model["source"]
        if "method" in model:  # one of isvit's models
            what = (f"{model['method']} W{model['w_bits']}/A{model['a_bits']}, {model['softmax_quantizer']} "
                    f"post-Softmax, from {what}")
        print(f"{kernel_summary(name, model)} [{what}]")
    precisions = sorted({s["inference_precision"] for m in models.values()
                         for s in m.get("openvino_settings", {}).values()})
    nncf_info, ort_info = results["nncf"], results["ort_int8"]
    print(f"OpenVINO inference precision: {', '.join(precisions)}; NNCF calibration {nncf_info['calibration_s']:.0f} s "
          f"on {nncf_info['images']} images{' (cached)' if nncf_info['cached'] else ''}")
    pre_process = "after" if ort_info["quant_pre_process"] else "without (it failed)"
    print(f"onnxruntime INT8 calibration {ort_info['calibration_s']:.0f} s on {ort_info['images']} images "
          f"{pre_process} quant_pre_process{' (cached)' if ort_info['cached'] else ''}")
    for name, model in models.items():
        if "onnxruntime_profile" in model:
            top = list(model["onnxruntime_profile"].items())[:4]
            print(f"onnxruntime profile, {name}: " + ", ".join(f"{op} x{v['nodes']} {100 * v['time_share']:.0f}%"
                                                              for op, v in top))
    print(f"load average before {env['cpu']['load_average']}, after {env['load_average_after']}")


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import nncf
    import openvino

    env = {**environment(args.threads), "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
           "nncf": nncf.__version__, "onnx": onnx.__version__}
    results = {"environment": env,
               "settings": {"model": args.model, "threads": args.threads, "batch_sizes": args.batch_sizes,
                            "repeats": args.repeats, "warmup": args.warmup, "ov_precision": args.ov_precision,
                            "seed": args.seed},
               "nncf": None, "ort_int8": None, "models": {}, "runs": []}
    core = openvino.Core()
    fp, weights = fp32_model(args.model, args.seed)
    data_config = isvit.resolve_data_config(fp)
    transform = isvit.build_transform(data_config)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = Path(args.cache) if args.cache else folder
        say("exporting the fp32 model to ONNX")
        onnx_paths = {FP32: folder / f"{args.model}_fp32.onnx"}
        export_onnx(fp, onnx_paths[FP32], model_name=args.model, config=None, data_config=data_config)
        models = {FP32: {"source": weights}}

        nncf_path, results["nncf"] = nncf_int8(onnx_paths[FP32], args.model, cache, ROOT / CALIB, transform,
                                               args.nncf_images, args.seed)
        models[NNCF] = {"source": f"nncf.quantize on {args.nncf_images} calibration images"}
        onnx_paths[ORT_INT8], results["ort_int8"] = ort_int8(onnx_paths[FP32], args.model, cache, ROOT / CALIB,
                                                             transform, args.nncf_images, args.seed)
        models[ORT_INT8] = {"source": f"onnxruntime.quantization.quantize_static on {args.nncf_images} calibration "
                                      "images (QDQ, int8 weights per channel, uint8 activations, MinMax)"}

        for checkpoint in args.quantized:
            say(f"exporting {checkpoint} to ONNX")
            path = folder / f"quantized_{len(onnx_paths)}.onnx"
            description = export_checkpoint(Path(checkpoint), args.model, path)
            name = model_name(description, set(models))
            models[name], onnx_paths[name] = description, path
        if args.make:
            calib = isvit.load_calibration_images(ROOT / CALIB, transform, args.calib_size, seed=args.seed,
                                                  progress=False)
            for spec in args.make:
                say(f"quantizing {':'.join(map(str, spec))} on {args.calib_size} images and exporting it to ONNX")
                path = folder / f"quantized_{len(onnx_paths)}.onnx"
                description = export_made(fp, args.model, spec, calib, args.seed, data_config, path)
                name = model_name(description, set(models))
                models[name], onnx_paths[name] = description, path
        quantized = [name for name in models if name not in (FP32, NNCF, ORT_INT8)]
        for name, path in onnx_paths.items():
            models[name]["file_mb"] = file_mb(path)
            models[name]["onnxruntime_ops"] = ort_graph_ops(path, args.threads[0], folder)
        models[NNCF]["file_mb"] = file_mb(nncf_path, nncf_path.with_suffix(".bin"))
        ov_paths = {FP32: onnx_paths[FP32], NNCF: nncf_path, **{name: onnx_paths[name] for name in quantized}}
        ov_models = openvino_models(ov_paths, quantized, args.ov_precision)
        for name, (path, precision) in ov_models.items():
            if name not in models:  # the second OpenVINO row of an isvit model: its file, another precision
                base = name.split("@")[0]
                models[name] = {"source": f"{base} compiled at {precision}", "file_mb": models[base]["file_mb"]}
            models[name]["openvino_precision_asked"] = precision
        for name in quantized:  # what isvit's load_onnx compiles it at (None: OpenVINO's default row)
            models[name]["isvit_openvino_precision"] = quantized_precision(core.read_model(str(onnx_paths[name])))

        for threads in args.threads:
            torch.set_num_threads(threads)
            say(f"{threads} thread(s): building the sessions")
            runners, compiled = build_runners(fp, onnx_paths, ov_models, core, threads)
            ov_precisions = {name: ov_settings(c)["inference_precision"] for name, c in compiled.items()}
            for batch, repeats in zip(args.batch_sizes, args.repeats):
                say(f"{threads} thread(s), batch {batch}: {len(runners)} models x {repeats} calls")
                x = torch.randn(batch, *data_config["input_size"], generator=torch.Generator().manual_seed(args.seed))
                times = time_interleaved(runners, x, args.warmup, repeats)
                results["runs"] += summarize(times, batch, threads, ov_precisions)
            for name, c in compiled.items():  # after the calls: the kernels of the last batch size
                models[name].setdefault("openvino_layers", ov_layers(c))
                models[name].setdefault("openvino_settings", {})[str(threads)] = ov_settings(c)
            del runners, compiled

        say("profiling one batch-1 call of each quantized model")
        x = torch.randn(1, *data_config["input_size"], generator=torch.Generator().manual_seed(args.seed))
        results["profile"] = {"batch": 1, "threads": args.threads[0]}
        for name in [ORT_INT8, *quantized]:
            models[name]["onnxruntime_profile"] = ort_profile(onnx_paths[name], args.threads[0], x, folder)
        if args.ov_profile:
            for name, (path, precision) in ov_models.items():
                models[name]["openvino_profile"] = ov_profile(core, path, args.threads[0], precision, x)
    results["models"] = models
    env["load_average_after"] = os.getloadavg()
    write_json(args.out, results)
    print_report(results)
    print(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
