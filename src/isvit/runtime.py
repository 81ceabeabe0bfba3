"""Running a file written by ``isvit export``: onnxruntime's CPU session or OpenVINO's compiled CPU
model, called like the PyTorch model, and the metadata that rebuilds its preprocessing and
configuration.

The file's format (``isvit-onnx-v1``): input ``images`` (N, 3, H, W) float32 with a dynamic batch,
output ``logits``, and ``metadata_props`` written by ``export.export_onnx``. Both runtimes read the
same file, and its metadata and names are checked by the same functions, in the same words.
OpenVINO also reads the IR of ``openvino_ir.export_openvino`` (``DIR/model.xml``, or DIR), whose
``rt_info`` carries the same metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_format, metadata_config, metadata_json
from .errors import IsvitError

FORMAT = "isvit-onnx-v1"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"

RUNTIMES = ("onnxruntime", "openvino")
# OpenVINO's INFERENCE_PRECISION_HINT on the CPU: f32, or bf16 where the CPU has it (AVX-512 BF16, AMX)
PRECISIONS = ("f32", "bf16")
# The OpenVINO IR's graph in its folder (the weights in model.bin beside it)
IR_FILE = "model.xml"


def require(module: str, extra: str = "onnx"):
    """Import an optional dependency of the ONNX path, or say which isvit extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise IsvitError(
            f"the ONNX path needs the {module} package, which is not installed: pip install 'isvit[{extra}]'"
        ) from None


# ---------------------------------------------------------------------------------------------
# What both runtimes share: the checks of the file, its metadata and its names
# ---------------------------------------------------------------------------------------------

def _error_line(exc: Exception, line: int) -> str:
    """One line of a runtime's (multi-line) error message, ``line`` 0 the first and -1 the last, or
    the error's type when it has no message (without the dashes OpenVINO lists its reasons with)."""
    lines = [text.strip().lstrip("- ") for text in str(exc).splitlines()]
    lines = [text for text in lines if text]
    return lines[line] if lines else type(exc).__name__


def _unreadable(path: Path, detail: str) -> IsvitError:
    return IsvitError(f"cannot load ONNX model file {path}, it is corrupt, truncated or not an ONNX model ({detail})")


def _metadata(props: dict[str, str], path: Path) -> dict:
    """The file's ``metadata_props``, checked: its format, model, model_args, data_config and config."""
    check_format(props, path, FORMAT, kind="an ONNX model exported by isvit", redo="export the model again")
    return {
        "model": props.get("model", ""),
        "model_args": metadata_json(props, "model_args", path, dict),
        "data_config": metadata_json(props, "data_config", path, dict),
        "config": metadata_config(props, path, allow_none=True),
    }


def _check_names(inputs: list[str], outputs: list[str], path: Path) -> None:
    if (inputs, outputs) != ([INPUT_NAME], [OUTPUT_NAME]):
        raise IsvitError(f"{path} does not have the input {INPUT_NAME!r} and output {OUTPUT_NAME!r} of an isvit export")


def _check_options(runtime: str, optimize: bool, precision: str | None) -> None:
    """Refuse a runtime isvit does not know and the options that belong to the other runtime."""
    if runtime not in RUNTIMES:
        raise IsvitError(f"unknown runtime {runtime!r}: the exported file runs with {' or '.join(RUNTIMES)}")
    if precision is not None and runtime != "openvino":
        raise IsvitError(f"precision={precision!r} is OpenVINO's inference precision: give it with runtime='openvino'")
    if precision not in (None, *PRECISIONS):
        raise IsvitError(f"unknown inference precision {precision!r}: OpenVINO takes {' or '.join(PRECISIONS)}")
    if not optimize and runtime != "onnxruntime":
        raise IsvitError("optimize=False turns off onnxruntime's graph optimizations: give it with runtime='onnxruntime'")


def load_onnx(
    path: str | Path,
    *,
    threads: int | None = None,
    optimize: bool = True,
    runtime: str = "onnxruntime",
    precision: str | None = None,
) -> tuple[nn.Module, dict]:
    """An exported model ready to run on the CPU, and its metadata (keys ``model``, ``model_args``,
    ``config`` (the method's config, None for full precision), ``data_config``).

    ``runtime``: ``"onnxruntime"`` (an ``OnnxModel``) or ``"openvino"`` (an ``OpenVinoModel``); both
    are modules called like the PyTorch model, with attributes ``runtime``, ``version`` and
    ``precision`` (the inference precision OpenVINO compiled the model for, None for onnxruntime).
    ``threads``: the runtime's threads (default: its own choice). ``optimize`` (onnxruntime only):
    all of onnxruntime's graph optimizations (its default; at W8/A8 this runs integer kernels), or
    none (each node as written: the float arithmetic of the PyTorch model). ``precision`` (OpenVINO
    only): its ``INFERENCE_PRECISION_HINT``, ``"f32"`` or ``"bf16"``; None gives a file whose
    post-Softmax codes are float arithmetic (activations below 8 bits) f32 and any other OpenVINO's
    default (bf16 on CPUs with AVX-512 BF16 or AMX, f32 elsewhere): ``quantized_precision`` says why. A CPU without bf16 runs f32 even when bf16 is asked
    for: ``precision`` on the returned model says what was compiled.

    OpenVINO also loads the model's OpenVINO IR (``isvit export --openvino DIR``): ``path`` the
    folder or its ``model.xml``."""
    _check_options(runtime, optimize, precision)
    path = Path(path)
    ir = _openvino_ir(path)
    if ir is not None and runtime == "openvino":
        if not ir.is_file():
            raise IsvitError(f"OpenVINO IR file {ir} does not exist")
        return _load_openvino(ir, threads, precision, ir=True)
    if ir is not None and ir.is_file():
        raise IsvitError(f"{path} is an OpenVINO IR, which {runtime} cannot run: load it with runtime='openvino' "
                         "(isvit eval: --runtime openvino)")
    if not path.is_file():
        raise IsvitError(f"ONNX model file {path} does not exist")
    if runtime == "openvino":
        return _load_openvino(path, threads, precision)
    return _load_onnxruntime(path, threads, optimize)


def _openvino_ir(path: Path) -> Path | None:
    """The IR's graph file where ``path`` names an OpenVINO IR (a folder, or a ``.xml`` file), else None."""
    if path.is_dir():
        return path / IR_FILE
    if path.suffix.lower() == ".xml":
        return path
    return None


# ---------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------

class OnnxModel(nn.Module):
    """An exported file in an onnxruntime CPU session, called like the PyTorch model: images
    (N, 3, H, W) in, logits out (CPU tensors). ``evaluate`` takes it as it takes a model."""

    runtime = "onnxruntime"
    precision = None  # onnxruntime has no inference-precision setting: float32, and integer kernels

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.version = require("onnxruntime").__version__

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def _load_onnxruntime(path: Path, threads: int | None, optimize: bool) -> tuple[OnnxModel, dict]:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: no warnings on stderr
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
        raise _unreadable(path, _error_line(exc, 0)) from exc
    info = _metadata(session.get_modelmeta().custom_metadata_map, path)
    _check_names([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()], path)
    return OnnxModel(session), info


# ---------------------------------------------------------------------------------------------
# OpenVINO
# ---------------------------------------------------------------------------------------------

class OpenVinoModel(nn.Module):
    """An exported file compiled by OpenVINO for the CPU, called like the PyTorch model: images
    (N, 3, H, W) in, logits out (CPU tensors). ``evaluate`` takes it as it takes a model."""

    runtime = "openvino"

    def __init__(self, compiled, version: str):
        super().__init__()
        self.compiled = compiled
        self.version = version
        # What the compiled model runs at, read back rather than assumed: on a CPU without bf16,
        # OpenVINO compiles f32 even when bf16 was asked for, and says so here.
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().numpy()
        # share_outputs=False: a copy, since the next call writes into the request's output buffer
        return torch.from_numpy(self.compiled({INPUT_NAME: array}, share_outputs=False)[OUTPUT_NAME])


def metadata_props(path: Path) -> dict[str, str]:
    """An ONNX file's metadata_props, read with onnx: OpenVINO does not keep them (the OpenVINO IR
    export copies them into the IR from here). onnx's strict parse
    also refuses a damaged file before OpenVINO would try each of its frontends on it (TensorFlow's
    logs to stderr)."""
    onnx = require("onnx", extra="openvino")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # google.protobuf's DecodeError and the like
        raise _unreadable(path, _error_line(exc, 0)) from exc
    return {p.key: p.value for p in proto.metadata_props}


def exact_openvino_config(core) -> dict:
    """OpenVINO CPU properties that make it compute what the file says: no dynamic quantization.
    On CPUs with VNNI or AMX, OpenVINO quantizes the activations of a Linear whose weights it keeps
    compressed (isvit's 7-8 bit weights, which carry a zero point) once more, to int8 per group of
    32 channels; those activations are already on the file's uint8 grid, so this second rounding
    is an error the method did not choose (on a small W8/A8 ViT it doubled the difference from
    PyTorch, to more than the quantization error itself). Older releases lack the property."""
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in core.get_property("CPU", "SUPPORTED_PROPERTIES"):
        return {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    return {}


def quantized_precision(model) -> str | None:
    """The inference precision isvit gives OpenVINO for ``model`` (as OpenVINO read it) when none is
    asked for: f32 where the file computes post-Softmax codes in float arithmetic (its ``Log``:
    activations below 8 bits with SULQ or log-sqrt2, or ``softmax8="method"``), which OpenVINO runs
    in bf16 at about half the speed; otherwise OpenVINO's own default (None: bf16 on CPUs with
    AVX-512 BF16 or AMX, f32 elsewhere). The products run in int8 whatever the precision: it decides
    the float work between them, and for a file with int8 products only, bf16 runs as fast as f32 at
    batch 1 and faster at large batches (measured in docs/onnx.md#openvino). The same in one line of
    OpenVINO: ``core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})``."""
    return "f32" if any(op.get_type_name() == "Log" for op in model.get_ops()) else None


def _ir_metadata(model) -> dict[str, str]:
    """The metadata an IR written by isvit carries in its rt_info, under ``isvit``: the ONNX file's
    metadata_props."""
    section = model.get_rt_info()["isvit"] if model.has_rt_info(["isvit"]) else {}
    if not isinstance(section, dict):
        return {}
    return {key: value.astype(str) for key, value in section.items()}


def _read_openvino(core, path: Path):
    try:
        return core.read_model(str(path))
    except Exception as exc:  # a valid ONNX file (onnx read it) that OpenVINO cannot convert, a damaged IR
        # OpenVINO's RuntimeError: its first lines name its own source files, the last one the reason
        raise IsvitError(f"OpenVINO cannot read {path} ({_error_line(exc, -1)})") from exc


def _load_openvino(path: Path, threads: int | None, precision: str | None,
                   ir: bool = False) -> tuple[OpenVinoModel, dict]:
    """``path`` compiled by OpenVINO for the CPU: an ONNX file, or with ``ir`` an IR's model.xml."""
    ov = require("openvino", extra="openvino")
    core = ov.Core()
    if ir:  # the metadata is in the model OpenVINO reads
        model = _read_openvino(core, path)
        info = _metadata(_ir_metadata(model), path)
    else:  # onnx reads and checks the metadata first: OpenVINO does not keep it
        info = _metadata(metadata_props(path), path)
        model = _read_openvino(core, path)
    _check_names([i.get_any_name() for i in model.inputs], [o.get_any_name() for o in model.outputs], path)
    config = {}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    precision = precision or quantized_precision(model)
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    config.update(exact_openvino_config(core))
    try:
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:
        raise IsvitError(f"OpenVINO cannot compile {path} for the CPU ({_error_line(exc, -1)})") from exc
    return OpenVinoModel(compiled, version=ov.__version__.split("-")[0]), info  # the release, without the build
