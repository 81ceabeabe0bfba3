"""Command line: ``isvit eval``, ``isvit quantize`` and ``isvit export``.

    isvit eval --model NAME [--weights PATH] --data DIR [--limit N] [--batch-size B] [--device D] [--json OUT]
    isvit eval --quantized FILE --data DIR [--limit N] ...      (a model saved by quantize --save)
    isvit eval --onnx FILE --data DIR [--runtime {onnxruntime,openvino}] [--inference-precision {f32,bf16}] ...
                                                                (a model exported by isvit export)
    isvit quantize --model NAME [--weights PATH] --calib DIR [--data DIR] --method {isvit,repq,minmax}
                   --w-bits W --a-bits A [--calib-size N] [--iters N] [--seed S] [--device D]
                   [--save OUT] [--json OUT] [--preset {paper,fast,thorough}] [--no-stage1] [--no-fold] [--gptq] [--rotate] ...
    isvit export --quantized FILE [--onnx OUT] [--openvino DIR]   (or --model NAME [--weights PATH]: full precision)

Results are printed as a table and, with ``--json``, written (atomically) as JSON. ``--save`` writes
the quantized model as an integer checkpoint (``checkpoint.py``) that ``eval --quantized`` rebuilds
alone; ``export`` writes it as an ONNX model in QDQ form (``export.py``) that ``eval --onnx`` runs
with onnxruntime or OpenVINO (``runtime.py``), and/or as that model's OpenVINO IR (``openvino_ir.py``).
``quantize`` without ``--data`` quantizes and saves without evaluating.
``quantize --resume DIR`` saves the state after each finished step in DIR and, started again,
carries on from there (``resume.py``). Bad input ends the program with one sentence on stderr and
exit status 2; an output that cannot be written is refused so before any work (``check_outputs``),
and missing folders on an output's path are created.

``eval`` and ``quantize`` run as they are under ``torchrun --nproc-per-node N -m isvit ...``: the
processes share the work (``distributed.py``, docs/distributed.md); only rank 0 prints and writes
files.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import timm
import torch
from tqdm.auto import tqdm

from . import __version__, distributed
from .checkpoint import atomic_write, float32_size, load_quantized, save_quantized
from .config import (
    CACHE_DTYPES,
    COMPUTE_DTYPES,
    CONFIGS,
    E2E_LOSSES,
    LOSSES,
    METHODS,
    PRESETS,
    ROUNDINGS,
    Config,
    IsvitConfig,
)
from .data import (
    ImageFolderDataset,
    build_transform,
    clean_error_message,
    load_calibration_images,
    make_loader,
    resolve_data_config,
)
from .errors import IsvitError
from .evaluate import evaluate
from .export import export_onnx
from .files import FILE, FOLDER, NEW_FOLDER, check_output
from .models import load_model
from .openvino_ir import check_destination, write_openvino
from .pipeline import applied_config, quantize, training_steps
from .quantizers import SOFTMAX_QUANTIZERS
from .runtime import PRECISIONS, RUNTIMES, load_onnx
from .wrap import is_block


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.replace(",", " ").split()]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers such as 0.5,0.5,0.5, got {text!r}")
    return tuple(parts)


class _DeprecatedFlag(argparse.Action):
    """An old flag kept for one release: sets ``dest`` to False like its replacement, with a warning."""

    def __init__(self, *args, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"isvit: warning: {option_string} is deprecated and will be removed in the next release: "
              f"use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, False)


MODEL_HELP = "timm architecture name, e.g. vit_tiny_patch16_224"
DATA_HELP = "evaluation images: a folder with labels.txt or DIR/<wnid>/*.JPEG"
# What each preset does, for --help; what each costs is measured in docs, not repeated here.
PRESET_HELP = (
    "paper (default): the paper's settings, Adam 4e-5, batch 64, 1000 iterations per block at <=4 bits, 200 above "
    "(hours on a CPU). fast: for CPUs, 140 iterations per block at 4 bits (in bf16 where the device is fast at it), 30 above, batch 32, QDrop, and at <=4 "
    "bits rotation, activation percentiles from 0.99, the Fisher-weighted loss and learnt rounding offsets; at <=3 bits "
    "100 iterations per block and 2 end-to-end epochs (minutes on a CPU). thorough: for GPUs, the fast preset's recipe with 3000 iterations per block at <=4 bits, 1000 above, "
    "training the latent weights (ste). On a CPU, paper and thorough print their expected duration after the first "
    "steps; see docs/results.md#cost for measured times"
)

# The rule for every output (--json, --save, --resume, --onnx, --openvino), checked by check_outputs.
OUTPUTS_HELP = ("Outputs: missing folders on an output's path are created (as mkdir -p); an output that cannot be "
                "written (a folder where a file goes, a place without write permission) is refused before any work.")


def _add_common(p: argparse.ArgumentParser, data_help: str = DATA_HELP, data_required: bool = True) -> None:
    p.add_argument("--weights", help="safetensors or PyTorch state dict, timm's or a Hugging Face transformers ViT, DeiT, DINOv2, SigLIP, SigLIP 2 NaFlex, Swin or DINOv3 (model.safetensors), or the folder save_pretrained wrote (shards too; what its config.json says of the image size, activation, LayerNorm eps and position grid is applied); default: timm's pretrained download")
    p.add_argument("--data", required=data_required, help=data_help)
    p.add_argument("--limit", type=_positive_int, help="evaluate on the first N images only")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--workers", type=int, default=None, help="data-loading worker processes (default 2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    pre = p.add_argument_group("preprocessing (default: timm's pretrained config of the model, or the one saved "
                               "with a --quantized model)")
    pre.add_argument("--mean", type=_floats3, help="normalisation mean, e.g. 0.485,0.456,0.406")
    pre.add_argument("--std", type=_floats3, help="normalisation std")
    pre.add_argument("--crop-pct", type=float, help="center-crop fraction, e.g. 0.875")
    pre.add_argument("--interpolation", help="resize interpolation: bicubic, bilinear, ...")
    pre.add_argument("--input-size", type=_positive_int, help="square input side in pixels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isvit", description="Post-training quantization of timm Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"isvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="top-1/top-5 of a full-precision model or of a saved quantized one",
                        epilog=OUTPUTS_HELP)
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help=MODEL_HELP)
    which.add_argument("--quantized", metavar="FILE", help="a quantized model saved by 'isvit quantize --save' "
                                                          "(architecture, weights and preprocessing come from it)")
    which.add_argument("--onnx", metavar="FILE", help="an ONNX model written by 'isvit export', run on the CPU by "
                                                      "onnxruntime or OpenVINO (preprocessing from the file), or its "
                                                      "OpenVINO IR (DIR or DIR/model.xml, with --runtime openvino)")
    _add_common(ev)
    ev.add_argument("--runtime", choices=RUNTIMES, help="with --onnx: what runs the file (default onnxruntime; "
                                                        "openvino needs pip install 'isvit[openvino]')")
    ev.add_argument("--inference-precision", choices=PRECISIONS,
                    help="with --runtime openvino: its inference precision (default: f32 for a file with post-Softmax "
                         "code arithmetic, activations below 8 bits; OpenVINO's own for any other; a CPU without bf16 runs f32)")

    qu = sub.add_parser("quantize", help="quantize a model and compare it with full precision", epilog=OUTPUTS_HELP)
    qu.add_argument("--model", required=True, help=MODEL_HELP + " of a supported family (docs/usage.md#supported-models)")
    _add_common(qu, data_help=DATA_HELP + "; without it the model is quantized (and saved with --save) but not evaluated",
                data_required=False)
    qu.add_argument("--calib", required=True, help="calibration images (labels not needed; flat folders work)")
    qu.add_argument("--method", required=True, choices=METHODS)
    qu.add_argument("--no-fp", action="store_true", help="do not evaluate the full-precision model for comparison")
    every = qu.add_argument_group("every method's settings (config.py: IsvitConfig, RepqConfig, MinmaxConfig)")
    every.add_argument("--w-bits", type=int, required=True, help="weight bits, 2..8")
    every.add_argument("--a-bits", type=int, required=True, help="activation bits, 2..8")
    every.add_argument("--calib-size", type=_positive_int, help="calibration images (default: 32 for repq/minmax, 1024 for isvit)")
    every.add_argument("--seed", type=int, help="seed of the calibration subset, the rotation and the optimisation (default 0)")
    every.add_argument("--softmax-quantizer", choices=SOFTMAX_QUANTIZERS, help="post-Softmax quantizer (default: the method's)")
    every.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                       help="correct the biases at the end (default: on for repq/minmax, off for isvit; "
                            "--no-bias-correction gives the published repq/minmax)")
    every.add_argument("--outlier-ratio", type=float, metavar="R",
                       help="per-tensor Linear inputs put the channels whose peak exceeds R times the median "
                            "channel's on a grid of their own; 0 is off (default: 8 for isvit, 0 for repq/minmax)")
    every.add_argument("--act-percentile", type=float, metavar="P",
                       help="lowest clipping percentile searched for activation grids, e.g. 0.99 (default: 0.99 for "
                            "isvit's fast and thorough presets at <= 4 bits, otherwise 0.999)")
    every.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                       help="rotate the residual stream and every attention head by random Hadamard matrices "
                            "first (exact in full precision, nothing added at inference; default: on for isvit's "
                            "fast and thorough presets at <= 4 bits, otherwise off)")
    sos = qu.add_argument_group("I&S-ViT's settings (--method isvit only; the other methods refuse them)")
    sos.add_argument("--preset", choices=PRESETS, help=PRESET_HELP)
    sos.add_argument("--stage1", action=argparse.BooleanOptionalAction, default=None,
                     help="stage 1: reconstruction with full-precision weights (default: on)")
    sos.add_argument("--fold", action=argparse.BooleanOptionalAction, default=None,
                     help="stage 2: fold the per-channel post-LayerNorm grids into LayerNorm + Linear (default: on; "
                          "--no-fold: post-LayerNorm activations per tensor from the start)")
    sos.add_argument("--no-reparam", action=_DeprecatedFlag, nargs=0, dest="fold", replacement="--no-fold",
                     help=argparse.SUPPRESS)
    sos.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                     help="start stage 3 from GPTQ-rounded weights instead of round-to-nearest ones (the paper's; default)")
    sos.add_argument("--iters", type=_positive_int, help="reconstruction iterations per block and stage (default: the preset's)")
    sos.add_argument("--recon-batch-size", type=_positive_int, help="reconstruction batch size (default: the preset's)")
    sos.add_argument("--lr", type=float, help="reconstruction learning rate (default: the preset's)")
    sos.add_argument("--loss", choices=LOSSES,
                     help="reconstruction loss: mse (the paper's), token (each token's error relative to its "
                          "variance, as the next LayerNorm sees it) or fisher (token, each output weighted by its "
                          "Fisher importance for the final prediction) (default: the preset's; fisher in the fast and thorough "
                          "presets at <= 4 bits)")
    sos.add_argument("--qdrop", type=float, metavar="P",
                     help="QDrop: while training, each activation keeps its float value with probability P "
                          "(default: the preset's, 0.5 fast, 0 paper)")
    sos.add_argument("--rounding", choices=ROUNDINGS,
                     help="stage 3 trains: ste (the latent weights through the rounding, the paper's), adaround "
                          "(learnt rounding, annealed) or offset (learnt rounding through the straight-through "
                          "estimator) (default: the preset's; offset in the fast preset at <= 4 bits, otherwise ste)")
    sos.add_argument("--round-lr", type=float, help="learning rate of the learnt rounding, with --rounding adaround or "
                                                    "offset (default: the preset's for that rounding: fast 0.3 adaround, "
                                                    "0.03 offset; paper and thorough 0.01)")
    sos.add_argument("--round-reg", type=float, help="weight of AdaRound's regulariser, with --rounding adaround "
                                                     "(default: the preset's: fast 1000, paper and thorough 0.1)")
    sos.add_argument("--learn-scales", action=argparse.BooleanOptionalAction, default=None,
                     help="also learn the uniform quantizers' scales (default: the preset's, off)")
    sos.add_argument("--scale-lr", type=float, help="learning rate of the learnt scales, on log(scale), with "
                                                    "--learn-scales (default: the preset's)")
    sos.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                     help="bfloat16: the reconstruction's forward and backward under torch.autocast, faster on CPUs "
                          "with AVX-512 BF16 or AMX and on GPUs; auto: bfloat16 where the device has fast bf16, "
                          "float32 elsewhere (default: the preset's)")
    sos.add_argument("--cache-dtype", choices=CACHE_DTYPES,
                     help="precision of the cached block inputs/outputs (default float32; float16 halves their memory)")
    sos.add_argument("--cache-device", help="where the cached block inputs/outputs live, e.g. cpu while the "
                                            "model trains on cuda (default: the model's device)")
    e2e = qu.add_argument_group("I&S-ViT's end-to-end stage after the block reconstruction (--method isvit only)")
    e2e.add_argument("--e2e-epochs", type=int, metavar="N",
                     help="train the whole model N passes over the calibration images towards the full-precision "
                          "outputs: every step size, bias and LayerNorm (default: the preset's, 0: off)")
    e2e.add_argument("--e2e-batch-size", type=_positive_int, help="its batch size (default 32)")
    e2e.add_argument("--e2e-lr", type=float, help="learning rate of the biases, LayerNorms and embeddings (default 1e-4)")
    e2e.add_argument("--e2e-scale-lr", type=float, help="learning rate of the step sizes, on log(scale) (default 1e-3)")
    e2e.add_argument("--e2e-round-lr", type=float,
                     help="also train each quantized weight's rounding (one code up or down an epoch) at this "
                          "learning rate, in steps (default 0: not trained)")
    e2e.add_argument("--e2e-softmax-lr", type=float,
                     help="also train the post-Softmax SULQ grids (log eta, the top of the log2 range) at this learning rate "
                          "(default 0: not trained)")
    e2e.add_argument("--e2e-augment", action=argparse.BooleanOptionalAction, default=None,
                     help="train on a random view of each batch (a flip, a crop of 60-100%%) with the full-precision "
                          "outputs computed on it (default: off)")
    e2e.add_argument("--e2e-compute-dtype", choices=COMPUTE_DTYPES,
                     help="as --compute-dtype, for the end-to-end stage (default: the preset's)")
    e2e.add_argument("--e2e-holdout", type=int, metavar="N",
                     help="keep N calibration images out of its training and stop at the first epoch that raises "
                          "its loss on them, undoing that epoch (default: the preset's)")
    e2e.add_argument("--e2e-loss", choices=E2E_LOSSES,
                     help="kl: of the output distributions (classifiers), mse: of each output token relative to "
                          "its variance (feature extractors), auto: kl where the model has a classifier, else mse (default)")
    qu.add_argument("--save", metavar="OUT", help="write the quantized model to OUT: integer weight codes and "
                                                  "quantizer parameters in one safetensors file")
    qu.add_argument("--resume", metavar="DIR", help="save the calibration's state in DIR after each finished step; "
                                                   "started again with the same command, carry on from there")

    ex = sub.add_parser("export", help="write a quantized model (or a full-precision one) as an ONNX model in QDQ form "
                                       "and/or as its OpenVINO IR", epilog=OUTPUTS_HELP)
    source = ex.add_mutually_exclusive_group(required=True)
    source.add_argument("--quantized", metavar="FILE", help="a quantized model saved by 'isvit quantize --save'")
    source.add_argument("--model", help=MODEL_HELP + " of a supported family (exported in full precision)")
    ex.add_argument("--weights", help="with --model: safetensors or PyTorch state dict, or a save_pretrained folder (timm or transformers, as for quantize); default: timm's pretrained download")
    ex.add_argument("--onnx", metavar="OUT", help="the ONNX file to write")
    ex.add_argument("--openvino", metavar="DIR", help="the folder (new or empty) to write the OpenVINO IR into, "
                                                      "DIR/model.xml and DIR/model.bin "
                                                      "(needs pip install 'isvit[openvino]')")
    ex.add_argument("--threads", type=_positive_int, help="CPU threads for torch while tracing (default: torch's choice)")
    return parser


def _device(name: str | None) -> torch.device:
    """The device named (default: cuda if available); under torchrun, cuda is the local rank's GPU."""
    if name is None:
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IsvitError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise IsvitError(f"device {name} was asked for but CUDA is not available")
    return distributed.local_device(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _environment() -> dict:
    """Versions, threads and processes; in a process group also every rank's peak memory (a
    collective: every rank calls it)."""
    env = {
        "isvit": __version__, "torch": torch.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "processes": distributed.world_size(),
    }
    if distributed.is_distributed():
        env["peak_rss_mb_per_rank"] = distributed.gather_objects(_peak_rss_mb())
    return env


def _print_table(rows: list[dict]) -> None:
    header = f"{'model':<24} {'method':<8} {'W/A':>5} {'top-1':>7} {'top-5':>7} {'images':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<24} {r['method']:<8} {r['wa']:>5} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['images']:>6}")


def _write_json(path: str | None, result: dict) -> None:
    """Write ``result`` to ``path`` (atomically; rank 0 only)."""
    if path and distributed.is_main():
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _report(rows: list[dict], summary: str) -> None:
    """Print the table (if there is anything to tabulate) and the summary line (rank 0 only)."""
    if distributed.is_main():
        if rows:
            _print_table(rows)
        print(summary)


def _progress(args) -> bool:
    return not args.quiet and distributed.is_main()


def _setup_device(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    return _device(args.device)


def _preprocessing(args, model, base: dict | None = None) -> dict:
    """The data config: ``base`` (or timm's for the model) with the command line's overrides."""
    return resolve_data_config(
        model, mean=args.mean, std=args.std, crop_pct=args.crop_pct,
        interpolation=args.interpolation, input_size=args.input_size, base=base,
    )


def _eval_loader(args, transform):
    dataset = ImageFolderDataset(args.data, transform, limit=args.limit)
    return make_loader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def _prepare(args, quantizable: bool = False):
    """Device, model, preprocessing, transform and the evaluation loader (None without --data);
    the model's arguments (from a save_pretrained folder's config.json) are kept in ``args.model_args``."""
    device = _setup_device(args)
    model, args.model_args = load_model(args.model, args.weights, device=device, quantizable=quantizable)
    data_config = _preprocessing(args, model)
    transform = build_transform(data_config)
    return device, model, data_config, transform, _eval_loader(args, transform) if args.data else None


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} seconds"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def run_eval(args) -> dict:
    for option, value in (("--runtime", args.runtime), ("--inference-precision", args.inference_precision)):
        if value and not args.onnx:
            raise IsvitError(f"{option} applies to an exported ONNX model only: give it with --onnx")
    if args.quantized:
        return run_eval_quantized(args)
    if args.onnx:
        return run_eval_onnx(args)
    device, model, data_config, _, loader = _prepare(args)
    metrics = evaluate(model, loader, device=device, progress=_progress(args), desc="full precision")
    result = {"model": args.model, "method": "fp32", "w_bits": 32, "a_bits": 32, **metrics,
              "data": args.data, "data_config": data_config, "peak_rss_mb": _peak_rss_mb(), **_environment()}
    _report([{"name": args.model, "method": "fp32", "wa": "32/32", **metrics}],
            f"eval {metrics['eval_seconds']:.1f} s, peak memory {result['peak_rss_mb']:.0f} MB")
    _write_json(args.json, result)
    return result


def run_eval_quantized(args) -> dict:
    """Evaluate a model rebuilt from its integer checkpoint alone."""
    if args.weights:
        raise IsvitError("--weights cannot be used with --quantized: the quantized model file holds the weights")
    device = _setup_device(args)
    model, info = load_quantized(args.quantized, device=device)
    config = info["config"]
    data_config = _preprocessing(args, model, base=info["data_config"])
    loader = _eval_loader(args, build_transform(data_config))
    wa = f"{config.w_bits}/{config.a_bits}"
    metrics = evaluate(model, loader, device=device, progress=_progress(args), desc=f"W{config.w_bits}/A{config.a_bits}")
    result = {"model": info["model"], "quantized": args.quantized, **config.to_dict(), **metrics, "data": args.data,
              "data_config": data_config, "peak_rss_mb": _peak_rss_mb(), "device": str(device), **_environment()}
    _report([{"name": info["model"], "method": config.method, "wa": wa, **metrics}],
            f"eval {metrics['eval_seconds']:.1f} s, peak memory {result['peak_rss_mb']:.0f} MB")
    _write_json(args.json, result)
    return result


def _runtime_label(model) -> str:
    """The runtime that runs an exported model, its version and (OpenVINO) the precision it compiled."""
    label = f"{model.runtime} {model.version}"
    return f"{label}, inference precision {model.precision}" if model.precision else label


def run_eval_onnx(args) -> dict:
    """Evaluate an exported ONNX model with onnxruntime or OpenVINO on the CPU, on the same data pipeline."""
    runtime = args.runtime or "onnxruntime"
    if args.weights:
        raise IsvitError("--weights cannot be used with --onnx: the ONNX model file holds the weights")
    if args.inference_precision and runtime != "openvino":
        raise IsvitError("--inference-precision is OpenVINO's inference precision: give it with --runtime openvino")
    if args.device is not None and _device(args.device).type != "cpu":
        raise IsvitError(f"eval --onnx runs on the CPU with {runtime}, not on {args.device}")
    # Several processes on one machine: the runtime takes torch's thread count (1 under torchrun
    # unless OMP_NUM_THREADS says otherwise) instead of every core each.
    threads = args.threads or (torch.get_num_threads() if distributed.is_distributed() else None)
    model, info = load_onnx(args.onnx, threads=threads, runtime=runtime, precision=args.inference_precision)
    label = _runtime_label(model)

    config = info["config"]
    quant = config.to_dict() if config else {"method": "fp32", "w_bits": 32, "a_bits": 32}
    wa = f"{quant['w_bits']}/{quant['a_bits']}"
    data_config = _preprocessing(args, None, base=info["data_config"])
    if data_config["input_size"] != info["data_config"]["input_size"]:
        size = "x".join(str(s) for s in info["data_config"]["input_size"][1:])
        raise IsvitError(f"{args.onnx} takes {size} images: --input-size cannot change that")
    loader = _eval_loader(args, build_transform(data_config))
    metrics = evaluate(model, loader, device="cpu", progress=_progress(args),
                       desc=f"{runtime} W{quant['w_bits']}/A{quant['a_bits']}")
    # the runtime and its version under its own name ("onnxruntime": "1.32.0"), OpenVINO's precision beside
    precision = {"inference_precision": model.precision} if model.precision else {}
    result = {"model": info["model"], "onnx": args.onnx, **quant, **metrics, "data": args.data,
              "data_config": data_config, "peak_rss_mb": _peak_rss_mb(), "device": "cpu",
              "runtime": model.runtime, model.runtime: model.version, **precision, **_environment()}
    _report([{"name": info["model"], "method": quant["method"], "wa": wa, **metrics}],
            f"eval {metrics['eval_seconds']:.1f} s ({label}), peak memory {result['peak_rss_mb']:.0f} MB")
    _write_json(args.json, result)
    return result


def run_export(args) -> dict:
    """Write a quantized model (from its integer checkpoint) or a full-precision one as ONNX, as an
    OpenVINO IR (built from the same ONNX graph), or both."""
    if not args.onnx and not args.openvino:
        raise IsvitError("nothing would be written: give --onnx FILE, --openvino DIR or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quantized:
        if args.weights:
            raise IsvitError("--weights cannot be used with --quantized: the quantized model file holds the weights")
        model, info = load_quantized(args.quantized)
        name, config, data_config, model_args = info["model"], info["config"], info["data_config"], info["model_args"]
    else:
        model, model_args = load_model(args.model, args.weights, quantizable=True)
        name, config, data_config = args.model, None, resolve_data_config(model)
    result = {"onnx": args.onnx, "openvino": args.openvino}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = args.onnx or str(Path(tmp) / "model.onnx")  # the IR alone: its ONNX graph in a temporary file
        counts = export_onnx(model, onnx_path, model_name=name, config=config, data_config=data_config,
                             model_args=model_args)
        if config is None:
            products = "full precision"
        else:
            products = f"{counts['integer']} integer products, {counts['float']} in float (see docs/onnx.md)"
        if args.onnx:
            result["bytes"] = Path(args.onnx).stat().st_size
            print(f"exported {args.onnx}: {_megabytes(result['bytes'])} ({products})")
        if args.openvino:
            result["openvino_bytes"] = write_openvino(onnx_path, args.openvino)
            print(f"exported {args.openvino} (OpenVINO IR): {_megabytes(result['openvino_bytes'])} ({products})")
    return {**result, "products": counts}


def _save_with_sizes(args, qmodel, fp_model, config, data_config) -> dict:
    """Write the integer checkpoint, print its size next to the fp32 weights' and return both."""
    save_quantized(qmodel, args.save, model_name=args.model, config=config, data_config=data_config,
                   model_args=args.model_args)
    size, fp32 = Path(args.save).stat().st_size, float32_size(fp_model)
    print(f"saved {args.save}: {_megabytes(size)} (fp32 weights: {_megabytes(fp32)}, {fp32 / size:.1f}x smaller)")
    return {"saved": args.save, "saved_bytes": size, "fp32_bytes": fp32}


# Every option of `isvit quantize` that sets a field of the method's config: (flag, field, whose).
# whose: "every" (every method's config has the field), "isvit" (IsvitConfig's), "reconstruction"
# (IsvitConfig's Reconstruction) or "end_to_end" (its EndToEnd). build_config reads this table, and
# nothing else copies options.
CONFIG_OPTIONS = (
    ("--w-bits", "w_bits", "every"),
    ("--a-bits", "a_bits", "every"),
    ("--calib-size", "calib_size", "every"),
    ("--seed", "seed", "every"),
    ("--softmax-quantizer", "softmax_quantizer", "every"),
    ("--bias-correction", "bias_correction", "every"),
    ("--outlier-ratio", "outlier_ratio", "every"),
    ("--act-percentile", "act_percentile", "every"),
    ("--rotate", "rotate", "every"),
    ("--preset", "preset", "isvit"),
    ("--stage1", "stage1", "isvit"),
    ("--fold", "fold", "isvit"),
    ("--gptq", "gptq", "isvit"),
    ("--iters", "iters", "reconstruction"),
    ("--recon-batch-size", "batch_size", "reconstruction"),
    ("--lr", "lr", "reconstruction"),
    ("--loss", "loss", "reconstruction"),
    ("--qdrop", "qdrop", "reconstruction"),
    ("--rounding", "rounding", "reconstruction"),
    ("--round-lr", "round_lr", "reconstruction"),
    ("--round-reg", "round_reg", "reconstruction"),
    ("--learn-scales", "learn_scales", "reconstruction"),
    ("--scale-lr", "scale_lr", "reconstruction"),
    ("--compute-dtype", "compute_dtype", "reconstruction"),
    ("--cache-dtype", "cache_dtype", "reconstruction"),
    ("--cache-device", "cache_device", "reconstruction"),
    ("--e2e-epochs", "epochs", "end_to_end"),
    ("--e2e-batch-size", "batch_size", "end_to_end"),
    ("--e2e-lr", "lr", "end_to_end"),
    ("--e2e-scale-lr", "scale_lr", "end_to_end"),
    ("--e2e-round-lr", "round_lr", "end_to_end"),
    ("--e2e-softmax-lr", "softmax_lr", "end_to_end"),
    ("--e2e-loss", "loss", "end_to_end"),
    ("--e2e-augment", "augment", "end_to_end"),
    ("--e2e-compute-dtype", "compute_dtype", "end_to_end"),
    ("--e2e-holdout", "holdout", "end_to_end"),
)


def _given_options(args) -> dict[str, tuple[str, str, object]]:
    """{flag: (field, whose, value)} of the CONFIG_OPTIONS given on the command line."""
    given = {}
    for flag, field, whose in CONFIG_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            given[flag] = (field, whose, value)
    return given


def _flag(flag: str, value) -> str:
    """The option as the user wrote it: --no-rotate for a False boolean."""
    return f"--no-{flag[2:]}" if value is False else flag


def build_config(args) -> Config:
    """The config of ``--method`` from the command line, before any work. An option the method does
    not read is refused in one sentence: the I&S-ViT settings for repq/minmax, and the settings that
    the reconstruction chosen would not read (--round-lr without a learnt rounding, --round-reg
    without AdaRound, --scale-lr without --learn-scales)."""
    given = _given_options(args)
    fields = {field: value for field, whose, value in given.values() if whose != "end_to_end"}
    if args.method != "isvit":
        ignored = [_flag(flag, value) for flag, (_, whose, value) in given.items() if whose != "every"]
        if ignored:
            raise IsvitError(f"--method {args.method} does not read {', '.join(ignored)}: "
                             f"{'they are' if len(ignored) > 1 else 'it is'} I&S-ViT's (--method isvit)")
        return CONFIGS[args.method](**fields)
    end_to_end = {field: value for field, whose, value in given.values() if whose == "end_to_end"}
    config = IsvitConfig.from_preset(**fields)
    if end_to_end:  # the preset's stage at these bits, with the options given
        config = replace(config, end_to_end=replace(config.resolved().end_to_end, **end_to_end))
    recon = config.resolved().reconstruction
    unread = [("--round-lr", recon.rounding == "ste",
               "it is the learnt rounding's learning rate and the rounding here is ste (give --rounding adaround or offset)"),
              ("--round-reg", recon.rounding != "adaround",
               f"it is AdaRound's regulariser and the rounding here is {recon.rounding} (give --rounding adaround)"),
              ("--scale-lr", not recon.learn_scales, "no step size is learnt here (give --learn-scales)")]
    for flag, unused, why in unread:
        if flag in given and unused:
            raise IsvitError(f"{flag} would not be read: {why}")
    return config


def _training_work(config: IsvitConfig, blocks: int) -> int:
    """What a config's training costs, in images through one block forward and backward, on a ViT
    of ``blocks`` blocks not wrapped yet: its units are the blocks and the two ends (the patch
    embedding, the head), and stage 1 skips the patch embedding (weights only, off in stage 1)."""
    steps = training_steps(config, stage1_units=blocks + 1, stage3_units=blocks + 2, blocks=blocks,
                           images=config.calib_size)
    return steps * config.resolved().reconstruction.batch_size


def _estimate_printer(config: Config, device: torch.device, model: torch.nn.Module) -> Callable[[float], None] | None:
    """For I&S-ViT's long presets (paper, thorough) on a CPU (hours of work): a callback that prints
    the estimated duration of the reconstruction once, and what the fast preset would take instead
    (the same estimate scaled by the two configs' ``_training_work``)."""
    if config.method != "isvit" or config.preset == "fast" or device.type != "cpu":
        return None
    blocks = sum(is_block(m) for m in model.modules())
    fast = IsvitConfig.from_preset("fast", w_bits=config.w_bits, a_bits=config.a_bits, calib_size=config.calib_size,
                                   stage1=config.stage1)
    fast_share = _training_work(fast, blocks) / _training_work(config, blocks)

    def report(seconds: float) -> None:
        tqdm.write(f"{config.preset} preset: about {_duration(seconds)} on this CPU (estimated from the first steps); "
                   f"--preset fast takes about {_duration(seconds * fast_share)}", file=sys.stderr)

    return report


def run_quantize(args) -> dict:
    config = build_config(args)
    if not args.data and not args.save:
        raise IsvitError("nothing would be kept: give --data to evaluate the quantized model, --save to write it, or both")
    if args.limit and not args.data:
        raise IsvitError("--limit needs --data: without it the quantized model is not evaluated")
    device, model, data_config, transform, loader = _prepare(args, quantizable=True)
    rows, result = [], {"model": args.model, "data": args.data, "calib": args.calib, "data_config": data_config}
    if loader is not None and not args.no_fp:
        fp = evaluate(model, loader, device=device, progress=_progress(args), desc="full precision")
        result.update(fp_top1=fp["top1"], fp_top5=fp["top5"])
        rows.append({"name": args.model, "method": "fp32", "wa": "32/32", **fp})

    start = time.perf_counter()
    calib = load_calibration_images(args.calib, transform, config.calib_size, seed=config.seed,
                                    progress=_progress(args))
    losses, seconds = {}, {}
    qmodel = quantize(model, calib, config, device=device, progress=_progress(args), resume_dir=args.resume,
                      on_estimate=_estimate_printer(config, device, model) if distributed.is_main() else None, losses=losses,
                      seconds=seconds)
    calib_seconds = distributed.max_over_ranks(time.perf_counter() - start)
    result.update(**applied_config(qmodel, config).to_dict(), calib_images=int(calib.shape[0]),
                  calib_seconds=calib_seconds)
    if seconds:  # isvit: each stage's duration
        result["stage_seconds"] = seconds
    end_to_end = losses.pop("end_to_end", None)
    if losses:  # isvit: each unit's reconstruction loss before and after training, per stage
        result["reconstruction_losses"] = {stage: {unit: {"before": before, "after": after, "restored": restored}
                                                   for unit, (before, after, restored) in units.items()}
                                           for stage, units in losses.items()}
    if end_to_end:  # each epoch's loss at its first and its last step; the held-out images' before and after each
        held_out = end_to_end.pop("end to end held-out", None)
        result["end_to_end_losses"] = {epoch: {"first": steps[0], "last": steps[-1]}
                                       for epoch, steps in end_to_end.items()}
        if held_out:
            result["end_to_end_held_out"] = held_out
    timings = f"calibration {calib_seconds:.1f} s"
    if loader is not None:
        metrics = evaluate(qmodel, loader, device=device, progress=_progress(args), desc=f"W{config.w_bits}/A{config.a_bits}")
        rows.append({"name": args.model, "method": config.method, "wa": f"{config.w_bits}/{config.a_bits}", **metrics})
        result.update(top1=metrics["top1"], top5=metrics["top5"], images=metrics["images"],
                      eval_seconds=metrics["eval_seconds"])
        timings += f", eval {metrics['eval_seconds']:.1f} s"
    result.update(peak_rss_mb=_peak_rss_mb(), device=str(device), **_environment())
    _report(rows, f"{timings}, peak memory {result['peak_rss_mb']:.0f} MB")
    if args.save and distributed.is_main():
        result.update(_save_with_sizes(args, qmodel, model, config, data_config))
    _write_json(args.json, result)
    return result


def _outputs(args) -> list[tuple[str, str, str]]:
    """(option, path, kind for files.check_output) of every output the command was given."""
    if args.command == "export":
        named = [("--onnx", args.onnx, FILE), ("--openvino", args.openvino, NEW_FOLDER)]
    elif args.command == "quantize":
        named = [("--save", args.save, FILE), ("--json", args.json, FILE), ("--resume", args.resume, FOLDER)]
    else:  # eval: its --onnx is the model to read
        named = [("--json", args.json, FILE)]
    return [(option, path, kind) for option, path, kind in named if path is not None]


def check_outputs(args) -> None:
    """Refuse, in one sentence, an output the command could not write, before any work: each one on
    its own (``files.check_output``; --openvino also needs the OpenVINO extra), two outputs on one
    path, and a file inside the --openvino folder (which must be new or empty when the IR is moved in)."""
    outputs = _outputs(args)
    for option, path, kind in outputs:
        if option == "--openvino":
            check_destination(path, f"--openvino {path}")
        else:
            check_output(path, kind, f"{option} {path}")
    for (option, path, _), (other, other_path, other_kind) in itertools.combinations(outputs, 2):
        full, other_full = Path(os.path.abspath(path)), Path(os.path.abspath(other_path))
        if full == other_full:
            raise IsvitError(f"{option} and {other} are both {path}: give each its own path")
        if other_kind == NEW_FOLDER and full.is_relative_to(other_full):
            raise IsvitError(f"{option} {path} is inside {other} {other_path}, which must be new or empty: "
                             "write it elsewhere")


def _check_outputs_on_rank0(args) -> None:
    """``check_outputs`` on rank 0, the one process that writes files; its sentence on every rank."""
    error = None
    if distributed.is_main():
        try:
            check_outputs(args)
        except IsvitError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error:
        raise IsvitError(error)


def _launch_device(args) -> torch.device:
    """The device that picks the backend of torchrun's process group (NCCL for a GPU, gloo on the CPU)."""
    if args.command == "export":
        raise IsvitError("isvit export runs in one process: run it without torchrun")
    return torch.device("cpu") if getattr(args, "onnx", None) else _device(args.device)


def _check_same_arguments(argv: Sequence[str]) -> None:
    digest = hashlib.blake2b(json.dumps(list(argv)).encode(), digest_size=16).hexdigest()
    distributed.check_same(digest, "arguments")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    started = False
    try:
        if distributed.launched_by_torchrun():
            started = distributed.start_from_env(_launch_device(args))
            _check_same_arguments(argv)
        _check_outputs_on_rank0(args)  # before any model, weights or images are read
        if args.command == "eval":
            run_eval(args)
        elif args.command == "export":
            run_export(args)
        else:
            run_quantize(args)
    except IsvitError as exc:
        print(f"isvit: error: {clean_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("isvit: interrupted", file=sys.stderr)
        return 130
    finally:
        if started:
            distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
