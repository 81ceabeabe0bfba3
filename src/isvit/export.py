"""ONNX export of a quantized model in QDQ form, and the exported file run with onnxruntime.

Export is three named stages:

1. ``trace``: ``torch.onnx.export`` (the dynamo exporter) traces the model while every quantizer of
   that one model leaves a placeholder node ``isvit::Quantizer`` (attribute ``name``) in the graph
   instead of its arithmetic (``exporting_quantizers``); the rest of the model (LayerNorm, Softmax,
   GELU, Swin's windows and masks ...) is what the exporter makes of the timm code;
2. ``lower_quantizers``: each placeholder is replaced by the ONNX form of its quantizer (below),
   built from the quantizer's own parameters;
3. the preprocessing, the architecture and the quantization config go into the model's
   ``metadata_props``, and the file is written atomically.

The ONNX form of each quantizer (format ``isvit-onnx-v1``), with ``L = 2^b`` levels:

- weight (uniform, per output channel): its integer codes 0..L-1 as a uint8 initializer and
  ``DequantizeLinear`` with the per-channel scale and uint8 zero point (``axis`` 0); a channel whose
  zero point is outside 0..255 (a weight row of one sign) makes the layer store ``codes - zero_point``
  as int32 instead, dequantized without a zero point;
- activation (uniform, per tensor): ``QuantizeLinear`` -> ``DequantizeLinear`` (uint8) with its scale
  and zero point. Below 8 bits a ``Clip`` to the b-bit grid's range ``[(0 - z) s, (L - 1 - z) s]``
  comes first, so that the codes stay in 0..L-1 instead of saturating at 255. Two kinds of grid are
  written as the float arithmetic of the PyTorch quantizer instead (``Div s, Round, Add z, Clip
  0..L-1, Sub z, Mul s``): a zero point outside 0..255 (a range that does not contain 0, such as a
  post-Softmax uniform grid), which uint8 cannot hold, and a per-channel grid (Swin's padded windows
  keep one before qkv), which no integer matrix product can take along its reduced dimension;
- SULQ (post-Softmax): ``Add eta, Log, Div ln 2, Sub ymin, Div step, Round, Clip 0..L-1, Cast`` gives
  the code, ``Gather`` on the table of the L values ``2^(q step + ymin) - eta`` gives the value;
- log-sqrt2 (post-Softmax): ``Max 1e-20, Div delta, Log, Div ln 2, Mul -2, Round, Clip 0..L, Cast``,
  then ``Gather`` on the L + 1 values ``delta 2^(-q/2)`` and 0 (codes past the last one give 0).

ONNX has no log2, so the two log-domain quantizers compute ``ln(x) / ln 2``: where that lands within
a rounding error of a code boundary, the code can differ by one from PyTorch's ``log2``.

``metadata_props``: ``format`` (``isvit-onnx-v1``), ``model`` (timm architecture), ``model_args``,
``config`` (``QuantConfig.to_dict()``, ``null`` for a full-precision export) and ``data_config`` (the
preprocessing), all JSON strings except the first two. The input is ``images`` (N, 3, H, W) float32
with a dynamic batch, the output ``logits``.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write
from .errors import IsvitError
from .pipeline import QuantConfig
from .quantizers import (
    ONNX_PLACEHOLDER_DOMAIN,
    ONNX_PLACEHOLDER_OP,
    LogSqrt2Quantizer,
    SULQuantizer,
    UniformQuantizer,
    is_weight_quantizer,
    named_quantizers,
)
from .runtime import FORMAT, INPUT_NAME, OUTPUT_NAME, OnnxModel, load_onnx, require  # noqa: F401 (load_onnx: public here too)

if TYPE_CHECKING:
    import onnx

EXPORTABLE_QUANTIZERS = (UniformQuantizer, SULQuantizer, LogSqrt2Quantizer)


# ---------------------------------------------------------------------------------------------
# Stage 0: what can be exported
# ---------------------------------------------------------------------------------------------

def check_exportable(model: nn.Module) -> None:
    """Refuse a model whose ONNX form would not compute what it computes: every quantizer on,
    calibrated and of a kind that has an ONNX form, float32 parameters."""
    for name, q in named_quantizers(model):
        if type(q) not in EXPORTABLE_QUANTIZERS:  # a subclass may change the grid: not isinstance
            raise IsvitError(
                f"quantizer {name} is a {type(q).__name__}, which has no ONNX form "
                "(isvit exports its uniform, SULQ and log-sqrt2 quantizers)"
            )
        if not q.enabled:
            raise IsvitError(f"quantizer {name} is switched off: switch every quantizer on before exporting the model")
        if not q.is_calibrated:
            raise IsvitError(f"quantizer {name} is not calibrated: quantize the model before exporting it")
        if isinstance(q, UniformQuantizer) and q.is_per_channel and not is_weight_quantizer(name) \
                and q.channel_dim >= 0:
            raise IsvitError(f"quantizer {name} is per channel along dimension {q.channel_dim}; "
                             "the ONNX export takes per-channel activations on the last dimension only")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise IsvitError(f"parameter {name} is {p.dtype}: the ONNX export takes float32 models only")


# ---------------------------------------------------------------------------------------------
# Stage 1: trace the model, quantizers as placeholders
# ---------------------------------------------------------------------------------------------

@contextmanager
def exporting_quantizers(model: nn.Module):
    """While inside, each quantizer of ``model`` returns a placeholder node named after it."""
    found = named_quantizers(model)
    for name, q in found:
        q.onnx_name = name
    try:
        yield
    finally:
        for _, q in found:
            q.onnx_name = None


def trace(model: nn.Module, input_size) -> onnx.ModelProto:
    """The model as an ONNX graph with a dynamic batch, quantizers left as placeholders."""
    if not hasattr(torch.onnx, "ops"):
        raise IsvitError(f"the ONNX export needs torch 2.8 or later (torch.onnx.ops), this is torch {torch.__version__}")
    require("onnxscript")  # the dynamo exporter's ONNX builder
    device = next(model.parameters()).device
    example = torch.zeros(2, *input_size, device=device)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch")
    with exporting_quantizers(model), torch.no_grad():
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), verbose=False,
            )
        except Exception as exc:  # the exporter's own error types, with pages of detail
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise IsvitError(f"torch.onnx.export cannot trace the model ({type(exc).__name__}: {detail})") from exc
    return program.model_proto


# ---------------------------------------------------------------------------------------------
# Stage 2: the placeholders become QuantizeLinear / DequantizeLinear / Gather subgraphs
# ---------------------------------------------------------------------------------------------

class _Builder:
    """New nodes and initializers for one graph, named after the quantizer they belong to."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}/{what}_{self._count}"

    def constant(self, what: str, value) -> str:
        from onnx import numpy_helper

        name = self.name(what)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        from onnx import helper

        output = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.name(op_type), **attrs))
        return output


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _grid(q: UniformQuantizer) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) as the quantizer uses them: float32, the scale clamped like its forward."""
    return _f32(q.scale.clamp_min(1e-8)), _f32(q.zero_point)


def _broadcast_shape(q: UniformQuantizer) -> list[int]:
    """Shape of per-channel constants in elementwise ops: (C, 1, ..., 1) for ``channel_dim``."""
    if not q.is_per_channel:
        return []
    return [-1] + [1] * (-q.channel_dim - 1)


def _fits_uint8(zero_point: np.ndarray) -> bool:
    return bool(np.all((zero_point >= 0) & (zero_point <= 255)))


def lower_weight(b: _Builder, q: UniformQuantizer, weight: torch.Tensor, output: str) -> None:
    """Integer codes as an initializer and DequantizeLinear (per output channel, axis 0)."""
    scale, zero_point = _grid(q)
    codes = q.codes(weight.detach()).cpu().numpy()
    per_channel = q.is_per_channel
    axis = {"axis": q.channel_dim} if per_channel else {}
    scale_c = b.constant("scale", scale if per_channel else scale.reshape(()))
    if _fits_uint8(zero_point):
        zp = zero_point.astype(np.uint8)
        zp_c = b.constant("zero_point", zp if per_channel else zp.reshape(()))
        b.op("DequantizeLinear", [b.constant("codes", codes.astype(np.uint8)), scale_c, zp_c], output, **axis)
    else:  # int32 carries any zero point: store codes - zero point, dequantized without one
        shape = [-1] + [1] * (codes.ndim - 1) if per_channel else []
        shifted = codes.astype(np.int64) - zero_point.astype(np.int64).reshape(shape)
        b.op("DequantizeLinear", [b.constant("codes_minus_zero_point", shifted.astype(np.int32)), scale_c], output, **axis)


def lower_activation(b: _Builder, q: UniformQuantizer, x: str, output: str) -> None:
    """Per tensor with a zero point in 0..255: QuantizeLinear -> DequantizeLinear (uint8), after a
    Clip to the b-bit range below 8 bits. Otherwise the float arithmetic itself: a per-channel grid
    along the reduced dimension of the next matrix product cannot go into an integer kernel (and
    onnxruntime's QDQ fusion would build a MatMulIntegerToFloat that fails at run time), and a
    zero point outside 0..255 does not fit uint8."""
    scale, zero_point = _grid(q)
    levels = q.levels
    if not q.is_per_channel and _fits_uint8(zero_point):
        scale_c = b.constant("scale", scale.reshape(()))
        zp_c = b.constant("zero_point", zero_point.astype(np.uint8).reshape(()))
        if levels < 256:  # QuantizeLinear saturates at 255: keep the codes in 0..L-1 exactly
            low = (np.float32(0) - zero_point) * scale
            high = (np.float32(levels - 1) - zero_point) * scale
            x = b.op("Clip", [x, b.constant("low", low.reshape(())), b.constant("high", high.reshape(()))])
        b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale_c, zp_c]), scale_c, zp_c], output)
        return
    shape = _broadcast_shape(q)
    scale_c = b.constant("scale", scale.reshape(shape))
    zp_c = b.constant("zero_point", zero_point.reshape(shape))
    code = b.op("Add", [b.op("Round", [b.op("Div", [x, scale_c])]), zp_c])
    code = b.op("Clip", [code, b.constant("low", np.float32(0)), b.constant("high", np.float32(levels - 1))])
    b.op("Mul", [b.op("Sub", [code, zp_c]), scale_c], output)


def _log2(b: _Builder, x: str) -> str:
    return b.op("Div", [b.op("Log", [x]), b.constant("ln2", np.float32(math.log(2.0)))])


def _lookup(b: _Builder, code: str, table: torch.Tensor, output: str) -> None:
    index = b.op("Cast", [code], to=6)  # INT32 (Gather takes int32 or int64 indices; int32 is faster)
    b.op("Gather", [b.constant("table", _f32(table)), index], output, axis=0)


def lower_sulq(b: _Builder, q: SULQuantizer, x: str, output: str) -> None:
    """code = clamp(round((log2(x + eta) - ymin) / step), 0, L-1); value = table[code]."""
    eta, ymin, ymax = (q.eta.float(), q.ymin.float(), q.ymax.float())
    step = (ymax - ymin) / (q.levels - 1)
    y = _log2(b, b.op("Add", [x, b.constant("eta", _f32(eta).reshape(()))]))
    code = b.op("Div", [b.op("Sub", [y, b.constant("ymin", _f32(ymin).reshape(()))]), b.constant("step", _f32(step).reshape(()))])
    code = b.op("Clip", [b.op("Round", [code]), b.constant("low", np.float32(0)), b.constant("high", np.float32(q.levels - 1))])
    _lookup(b, code, q.table().float(), output)


def lower_log2sqrt2(b: _Builder, q: LogSqrt2Quantizer, x: str, output: str) -> None:
    """code = clamp(round(-2 log2(max(x, 1e-20) / delta)), 0, L); value = table[code], table[L] = 0."""
    delta = q.delta.float().reshape(())
    ratio = b.op("Div", [b.op("Max", [x, b.constant("tiny", np.float32(1e-20))]), b.constant("delta", _f32(delta))])
    code = b.op("Round", [b.op("Mul", [_log2(b, ratio), b.constant("minus_two", np.float32(-2))])])
    code = b.op("Clip", [code, b.constant("low", np.float32(0)), b.constant("high", np.float32(q.levels))])
    values = torch.arange(q.levels, dtype=torch.float32, device=delta.device).neg_().div_(2).exp2_().mul_(delta)
    _lookup(b, code, torch.cat([values, values.new_zeros(1)]), output)


def lower_quantizers(proto, model: nn.Module) -> dict[str, int]:
    """Replace every placeholder of ``proto`` (in place) by its quantizer's ONNX form; returns how
    many placeholders of each quantizer kind were lowered."""
    from onnx import helper

    found = dict(named_quantizers(model))
    modules = dict(model.named_modules())
    graph = proto.graph
    nodes, counts = [], {}
    for node in graph.node:
        if node.domain != ONNX_PLACEHOLDER_DOMAIN or node.op_type != ONNX_PLACEHOLDER_OP:
            nodes.append(node)
            continue
        name = helper.get_attribute_value(node.attribute[0]).decode()
        q = found[name]
        b = _Builder(name)
        x, output = node.input[0], node.output[0]
        if isinstance(q, UniformQuantizer) and is_weight_quantizer(name):
            lower_weight(b, q, modules[name.rsplit(".", 1)[0]].weight, output)
            kind = "weight"
        elif isinstance(q, UniformQuantizer):
            lower_activation(b, q, x, output)
            kind = "uniform"
        elif isinstance(q, SULQuantizer):
            lower_sulq(b, q, x, output)
            kind = "sulq"
        else:
            lower_log2sqrt2(b, q, x, output)
            kind = "log2sqrt2"
        nodes.extend(b.nodes)
        graph.initializer.extend(b.initializers)
        counts[kind] = counts.get(kind, 0) + 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    kept = [o for o in proto.opset_import if o.domain != ONNX_PLACEHOLDER_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return counts


def _drop_unused_initializers(graph) -> None:
    """Remove initializers no node reads (the float weights replaced by their codes)."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


# ---------------------------------------------------------------------------------------------
# Export: the three stages and an atomic write
# ---------------------------------------------------------------------------------------------

def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    model_name: str,
    config: QuantConfig | None,
    data_config: dict,
    model_args: dict | None = None,
) -> dict[str, int]:
    """Write ``model`` (quantized by ``isvit.quantize``, or full precision with ``config=None``) as
    an ONNX model in QDQ form, atomically. Returns the number of quantizers lowered, by kind."""
    onnx = require("onnx")
    check_exportable(model)
    if config is None and named_quantizers(model):
        raise IsvitError("the model is quantized: give its QuantConfig to export it")
    if config is not None and not named_quantizers(model):
        raise IsvitError("the model has no quantizers: quantize it before exporting it with a QuantConfig")
    model = model.eval()
    proto = trace(model, data_config["input_size"])
    counts = lower_quantizers(proto, model)
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "model_args": json.dumps(model_args or {}),
        "config": json.dumps(config.to_dict() if config is not None else None),
        "data_config": json.dumps(data_config),
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    return counts
