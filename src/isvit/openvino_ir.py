"""OpenVINO IR export of a quantized model: the ONNX file of ``export.export_onnx`` read by OpenVINO,
its weights folded to integer constants at their bit-width, written as ``DIR/model.xml`` and
``DIR/model.bin`` so that an OpenVINO user deploys it without converting.

The IR is the ONNX file's graph as OpenVINO's ONNX frontend reads it (activation QDQ pairs as
``FakeQuantize``, each weight's ``DequantizeLinear`` as ``Convert`` to f32 and ``Multiply`` by its
scale), with two changes:

1. ``fold_constants``: OpenVINO's ``ConstantFolding`` computes the arithmetic that unpacks each packed
   weight into one int8 constant. Left to itself it would also fold each weight's ``Convert`` from
   int8 to f32 into a float32 constant, which OpenVINO's CPU plugin then runs as a float product:
   those ``Convert`` nodes are kept.
2. ``store_narrow``: each weight whose codes take at most 2^b values in every channel of its scale
   (a per-channel weight of b bits: its codes ``q - z`` span ``-z .. 2^b - 1 - z``) is stored as
   unsigned b-bit codes (OpenVINO's ``u1``, ``u2``, ``u3``, ``u4``, ``u6``; a 5-bit weight as u6) and
   an int8 zero point per channel, ``Convert`` to i8 and ``Subtract``: integer arithmetic on
   constants, which the CPU plugin folds back into the int8 weight of its int8 ``FullyConnected``
   when it compiles the IR. 7 and 8-bit weights stay int8. (A signed ``i4`` constant would need
   every code of the weight in -8..7, which per-channel zero points rule out; an unsigned weight
   with its zero point on the float path instead, ``u4 -> Convert f32 -> Subtract -> Multiply``, is
   OpenVINO's compressed-weight form, which its CPU plugin runs as a float product.)

The metadata the ONNX file carries in ``metadata_props`` (format, model, model_args, config,
data_config, export) is in the IR's ``rt_info`` under ``isvit``, so ``runtime.load_onnx(DIR,
runtime="openvino")`` reads and checks it as it does the ONNX file's. Weights are saved as they
are (``compress_to_fp16=False``: fp16 would change the float32 scales), into a temporary folder
beside DIR that is renamed to DIR once complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from .config import Config
from .errors import IsvitError
from .export import export_onnx
from .files import NEW_FOLDER, check_output
from .runtime import IR_FILE, metadata_props, require

# ov::pass::DisableConstantFolding's key in a node's rt_info (its type name and version): OpenVINO's
# Python API has no call that sets it. fold_constants checks that it still works.
KEEP_UNFOLDED = "DisableConstantFolding_0"
# OpenVINO's unsigned integer types below 8 bits, narrowest first: (type name, bits)
NARROW_TYPES = (("u1", 1), ("u2", 2), ("u3", 3), ("u4", 4), ("u6", 6))


# ---------------------------------------------------------------------------------------------
# Where the IR goes: refused before any work
# ---------------------------------------------------------------------------------------------

def check_destination(folder: str | Path, label: str | None = None) -> Path:
    """Refuse, in one sentence, a destination the IR cannot be written to (``files.check_output``: an
    existing file, a folder that is not empty, or a place that cannot be created or written); and say
    how to install OpenVINO where it is missing. ``label`` names the folder in the sentence."""
    require("openvino", extra="openvino")
    return check_output(folder, NEW_FOLDER, label or f"OpenVINO IR folder {folder}")


# ---------------------------------------------------------------------------------------------
# The ONNX graph as OpenVINO reads it: weights folded, then stored narrow
# ---------------------------------------------------------------------------------------------

def _dequantizing_converts(model) -> list:
    """The ``Convert`` nodes from int8 to a float type: each weight's ``DequantizeLinear`` (and a
    signed activation's zero point)."""
    import openvino as ov

    return [node for node in model.get_ordered_ops()
            if node.get_type_name() == "Convert" and node.get_input_element_type(0) == ov.Type.i8
            and node.get_output_element_type(0).is_real()]


def fold_constants(model) -> None:
    """Run OpenVINO's ConstantFolding on ``model`` (in place): every weight's unpacking arithmetic
    becomes one int8 constant, its ``Convert`` to float kept (the form of an int8 weight that the
    CPU plugin's int8 kernels take)."""
    import openvino as ov
    from openvino import passes

    keep = _dequantizing_converts(model)
    for node in keep:
        node.get_rt_info()[KEEP_UNFOLDED] = True
    manager = passes.Manager()
    manager.register_pass(passes.ConstantFolding())
    manager.run_passes(model)
    for node in keep:
        del node.get_rt_info()[KEEP_UNFOLDED]
    if len(_dequantizing_converts(model)) != len(keep):
        raise IsvitError(f"OpenVINO {ov.__version__.split('-')[0]} folds the weights' int8 codes into float "
                         "constants, which its CPU plugin runs as float products: isvit cannot write the IR with it")


def weight_codes(model) -> list[tuple]:
    """(int8 constant, its Convert to float, its scale's shape) of every weight of ``model``: an int8
    constant of two dimensions or more, read by a Convert whose value a Multiply scales."""
    import openvino as ov

    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or node.get_element_type() != ov.Type.i8 \
                or len(node.get_output_shape(0)) < 2:
            continue
        readers = [target.get_node() for target in node.output(0).get_target_inputs()]
        if len(readers) != 1 or readers[0].get_type_name() != "Convert":
            continue
        convert = readers[0]
        scales = [target.get_node() for target in convert.output(0).get_target_inputs()]
        if len(scales) != 1 or scales[0].get_type_name() != "Multiply":
            continue
        multiply = scales[0]
        scale = multiply.input_value(1 if multiply.input_value(0).get_node() is convert else 0)
        found.append((node, convert, tuple(scale.get_shape())))
    return found


def narrow_type(codes: np.ndarray, scale_shape: tuple[int, ...]) -> tuple[str | None, np.ndarray]:
    """(the narrowest of ``NARROW_TYPES`` that holds the codes of each channel of the scale, the
    codes' smallest value in each channel), or (None, ...) where none does, where the zero point
    (that value negated) does not fit int8, or where codes and zero points would take more bytes
    than int8 codes (a weight of one value a channel: the outlier rows of a small product)."""
    shape = ((1,) * codes.ndim + scale_shape)[-codes.ndim:]  # the scale's shape as it broadcasts on the codes
    axes = tuple(d for d in range(codes.ndim) if shape[d] == 1)
    low = codes.min(axis=axes, keepdims=True).astype(np.int16)
    levels = int((codes.max(axis=axes, keepdims=True) - low).max()) + 1
    if low.min() == np.iinfo(np.int8).min:
        return None, low
    for name, bits in NARROW_TYPES:
        if levels <= 2 ** bits:
            smaller = codes.size * bits / 8 + low.size < codes.size
            return (name if smaller else None), low
    return None, low


def store_narrow(model) -> None:
    """Store each weight of ``model`` (in place) as unsigned codes of the narrowest type that holds
    them, converted to int8 less an int8 zero point per channel (``narrow_type``); the others stay
    int8 codes."""
    import openvino as ov
    from openvino import opset13 as ops

    for constant, convert, scale_shape in weight_codes(model):
        codes = constant.get_data()
        name, low = narrow_type(codes, scale_shape)
        if name is None:
            continue
        narrow = ops.constant((codes - low).astype(np.uint8), dtype=getattr(ov.Type, name))
        signed = ops.subtract(ops.convert(narrow, "i8"), ops.constant((-low).astype(np.int8)))
        signed.set_friendly_name(constant.get_friendly_name())
        convert.input(0).replace_source_output(signed.output(0))


# ---------------------------------------------------------------------------------------------
# Export: an ONNX file as an IR, written atomically
# ---------------------------------------------------------------------------------------------

def _save_folder(model, folder: Path) -> int:
    """Save ``model`` as ``folder/model.xml`` and ``model.bin``: written into a temporary folder beside
    ``folder``, renamed to it once complete (never a half-written folder). Returns the IR's size in bytes."""
    import openvino as ov

    folder.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.absolute().parent / f".{folder.name}.{secrets.token_hex(8)}.tmp"
    tmp.mkdir()  # the permissions of a new folder, 0777 less the umask
    try:
        ov.save_model(model, str(tmp / IR_FILE), compress_to_fp16=False)
        size = sum(f.stat().st_size for f in tmp.iterdir())
        try:
            os.replace(tmp, folder)  # onto a missing or empty folder
        except OSError as exc:
            raise IsvitError(f"cannot move the OpenVINO IR into {folder} ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size


def write_openvino(onnx_path: str | Path, folder: str | Path) -> int:
    """Write the ONNX file ``onnx_path`` (written by ``export_onnx``) as an OpenVINO IR in ``folder``
    (new, or empty): its weights folded and stored at their bit-width, its metadata in the IR's
    rt_info (module docstring). Returns the IR's size in bytes."""
    ov = require("openvino", extra="openvino")
    folder = check_destination(folder)
    model = ov.Core().read_model(str(onnx_path))
    fold_constants(model)
    store_narrow(model)
    for key, value in metadata_props(Path(onnx_path)).items():
        model.set_rt_info(value, ["isvit", key])
    return _save_folder(model, folder)


def export_openvino(
    model: nn.Module,
    folder: str | Path,
    *,
    model_name: str,
    config: Config | None,
    data_config: dict,
    model_args: dict | None = None,
) -> dict[str, int]:
    """Write ``model`` (quantized by ``isvit.quantize``, or full precision with ``config=None``) as an
    OpenVINO IR, ``folder/model.xml`` and ``folder/model.bin``, atomically; ``folder`` must be new or
    empty. Returns what ``export_onnx`` returns (how many matrix products are integer and how many
    float) and the IR's size in bytes (``bytes``)."""
    folder = check_destination(folder)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        counts = export_onnx(model, onnx_path, model_name=model_name, config=config, data_config=data_config,
                             model_args=model_args)
        return {**counts, "bytes": write_openvino(onnx_path, folder)}
