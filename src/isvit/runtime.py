"""Running a file written by ``isvit export``: the CPU session that computes it, called like the
PyTorch model, and the metadata that rebuilds its preprocessing and configuration.

The file's format (``isvit-onnx-v1``): input ``images`` (N, 3, H, W) float32 with a dynamic batch,
output ``logits``, and ``metadata_props`` written by ``export.export_onnx``.
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


def require(module: str):
    """Import an optional dependency of the ONNX path, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise IsvitError(
            f"the ONNX path needs the {module} package, which is not installed: pip install 'isvit[onnx]'"
        ) from None


# ---------------------------------------------------------------------------------------------
# Running an exported file with onnxruntime
# ---------------------------------------------------------------------------------------------

class OnnxModel(nn.Module):
    """An exported file in an onnxruntime CPU session, called like the PyTorch model: images
    (N, 3, H, W) in, logits out (CPU tensors). ``evaluate`` takes it as it takes a model."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def _metadata(session, path: Path) -> dict:
    props = session.get_modelmeta().custom_metadata_map
    check_format(props, path, FORMAT, kind="an ONNX model exported by isvit", redo="export the model again")
    return {
        "model": props.get("model", ""),
        "model_args": metadata_json(props, "model_args", path, dict),
        "data_config": metadata_json(props, "data_config", path, dict),
        "config": metadata_config(props, path, allow_none=True),
    }


def load_onnx(path: str | Path, *, threads: int | None = None, optimize: bool = True) -> tuple[OnnxModel, dict]:
    """An exported model in an onnxruntime CPU session, and its metadata (keys ``model``,
    ``model_args``, ``config`` (a ``QuantConfig``, None for full precision), ``data_config``).

    ``threads``: onnxruntime's intra-op threads (default: its own choice). ``optimize``: all of
    onnxruntime's graph optimizations (its default; at W8/A8 this runs integer kernels), or none
    (each node as written: the float arithmetic of the PyTorch model)."""
    ort = require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise IsvitError(f"ONNX model file {path} does not exist")
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
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IsvitError(f"cannot load ONNX model file {path}, it is corrupt, truncated or not an ONNX model ({detail})") from exc
    info = _metadata(session, path)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise IsvitError(f"{path} does not have the input {INPUT_NAME!r} and output {OUTPUT_NAME!r} of an isvit export")
    return OnnxModel(session), info
