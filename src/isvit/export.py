"""ONNX export of a quantized model: every matrix product an integer product for the runtimes'
int8 kernels, weights packed to their bit-width.

Export is three named stages:

1. ``trace``: ``torch.onnx.export`` (the dynamo exporter) traces the model while each quantized
   layer of that one model (``QuantLinear``, ``QuantConv2d``, ``QuantMatMul``) leaves a placeholder
   node ``isvit::<class>`` in the graph instead of its arithmetic (``exporting_layers``); the rest of
   the model (LayerNorm, Softmax, GELU, Swin's windows and masks ...) is what the exporter makes of
   the timm code;
2. ``lower_layers``: each placeholder is replaced by the layer's integer form (below), built from
   its weight and its quantizers' parameters;
3. the preprocessing, the architecture and the quantization config go into the model's
   ``metadata_props``, and the file is written atomically.

The forms (format ``isvit-onnx-v1``), for grids of ``L = 2^b`` levels. Every product is
``DequantizeLinear(uint8 activation codes) x DequantizeLinear(int8 or uint8 weight codes)``, the
QDQ pattern that onnxruntime fuses into ``MatMulIntegerToFloat`` / ``QLinearMatMul`` and OpenVINO
into its int8 FullyConnected and MatMul:

- weights (uniform, per output channel, scale s and zero point z): the codes ``q - z`` as int8
  without a zero point where ``|q - z| <= 64`` (every weight of 6 bits or fewer): symmetric int8 is
  what OpenVINO's int8 kernels take (a zero point makes it dequantize the weights to float) and, for
  the product with any uint8 activation, cannot saturate the 16-bit pair sums of the AVX2 u8 x s8
  instruction onnxruntime uses; otherwise the codes q as uint8 with the per-channel zero point
  (onnxruntime's u8 x u8 kernels), and a zero point outside 0..255 (a row of one sign) stores
  ``q - z`` as int32 (a float product). Below 8 bits the codes are stored packed to b bits (bit
  planes of the unsigned codes in uint8 initializers, ``pack_bits``) and unpacked by integer
  arithmetic on constants (``Div``, ``Mod``, ``Mul``, ``ReduceSum``, ``Sub z``, ``Cast``), which both
  runtimes fold into plain int8 weights when they load the file: a W4 file holds 4 bits a weight,
  a W3 file 3. (Bit shifts would be the natural unpacking; OpenVINO 2026.4 does not fold them and
  then computes the product wrongly.) A Linear's weight is stored as its MatMul reads it,
  transposed (in, out);
- activations (uniform, per tensor): ``QuantizeLinear -> DequantizeLinear`` (uint8) with the scale
  and the zero point ``max(z, 0)``, after a ``Clip`` to the grid's range ``[(0 - z) s, (L - 1 - z) s]``
  below 8 bits, so that the codes are exactly the b-bit ones (``QuantizeLinear`` alone saturates at
  0..255). A zero point below 0 (a range that starts above 0, such as a post-Softmax map on few
  tokens) is shifted to 0: the same values, codes ``q - z``. Only a range uint8 cannot hold even
  shifted (z > 255, or z < L - 256) is written as the PyTorch arithmetic (``Div s, Round, Add z,
  Clip 0..L-1, Sub z, Mul s``) and its product runs in float;
- outlier channels on a grid of their own (two (scale, zero point) pairs, ``search_split_range``):
  two integer products summed, ``x W^T = Q_main(x) W_main^T + Q_out(x[:, idx]) W[:, idx]^T``, the
  outlier columns of ``W_main`` zero (a ``Gather`` takes the few outlier channels). Any other
  per-channel activation grid (Swin keeps one before qkv where it pads its windows) cannot go into
  an integer product along its reduced dimension: its PyTorch arithmetic and a float product;
- post-Softmax SULQ and log-sqrt2: the code from the PyTorch arithmetic in elementwise ops (``Add
  eta, Log, Mul, Add, Round, Clip``; log-sqrt2: ``Max 1e-20, Log, Mul, Add, Round, Clip 0..L``), its
  value ``Exp(code * a + c)`` (``- eta``; log-sqrt2: 0 past the last code, a mask at 4 bits or
  fewer), then ``QuantizeLinear -> DequantizeLinear`` on the uint8 grid of step ``t_max / 255``
  (``t_max`` the largest value of the table): the table of the L values folded onto uint8, so
  that attn @ v is an integer product. That fold moves each attention value by at most half a
  step (``t_max / 510``): the one re-expression of the export, measured in docs/onnx.md;
- a Linear on a 2-d input (the head): unsqueezed to 3-d around its MatMul, because onnxruntime
  fuses a 2-d MatMul + Add into a float ``Gemm`` before it looks for integer products;
- the patch-embedding Conv: its weight's codes and ``DequantizeLinear``; the image is not quantized,
  so the convolution runs in float.

ONNX has no log2, so the two log-domain quantizers compute ``ln(x) / ln 2`` (folded into one ``Mul``):
where that lands within a rounding error of a code boundary, the code can differ by one from
PyTorch's ``log2``.

``metadata_props``: ``format`` (``isvit-onnx-v1``), ``model`` (timm architecture), ``model_args``,
``config`` (``QuantConfig.to_dict()``, ``null`` for a full-precision export) and ``data_config`` (the
preprocessing), all JSON strings except the first two. The input is ``images`` (N, 3, H, W) float32
with a dynamic batch, the output ``logits``.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write
from .errors import IsvitError
from .modules import ONNX_PLACEHOLDER_DOMAIN, ONNX_PLACEHOLDER_OPS, QuantConv2d, QuantLinear, QuantMatMul
from .pipeline import QuantConfig, applied_config
from .quantizers import LogSqrt2Quantizer, SULQuantizer, UniformQuantizer, is_weight_quantizer, named_quantizers
from .runtime import FORMAT, INPUT_NAME, OUTPUT_NAME, OnnxModel, load_onnx, require  # noqa: F401 (load_onnx: public here too)

if TYPE_CHECKING:
    import onnx

EXPORTABLE_QUANTIZERS = (UniformQuantizer, SULQuantizer, LogSqrt2Quantizer)
QUANTIZED_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)
# Weights whose codes q - z all lie within +-64 are stored as symmetric int8: 2 * 255 * 64 < 2^15,
# so no pair of uint8 x int8 products can saturate the AVX2 instruction (vpmaddubsw) onnxruntime
# multiplies them with.
MAX_SIGNED_WEIGHT = 64
# The uint8 grid that a post-Softmax table is folded onto: its largest value is code 255.
TABLE_CODES = 255


# ---------------------------------------------------------------------------------------------
# Stage 0: what can be exported
# ---------------------------------------------------------------------------------------------

def check_exportable(model: nn.Module) -> None:
    """Refuse a model whose ONNX form would not compute what it computes: every quantizer on,
    calibrated, of a kind that has an ONNX form and inside a quantized layer; float32 parameters."""
    owned = {f"{name}.{child}" for name, layer in model.named_modules() if isinstance(layer, QUANTIZED_LAYERS)
             for child, _ in layer.named_children()}
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
        if name not in owned:
            raise IsvitError(f"quantizer {name} is not part of a quantized Linear, Conv2d or matrix product, "
                             "which is all the ONNX export lowers")
        if isinstance(q, UniformQuantizer) and q.is_per_channel and not is_weight_quantizer(name) \
                and q.channel_dim >= 0:
            raise IsvitError(f"quantizer {name} is per channel along dimension {q.channel_dim}; "
                             "the ONNX export takes per-channel activations on the last dimension only")
    for name, layer in model.named_modules():
        if isinstance(layer, QuantConv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
            raise IsvitError(f"{name} pads with {layer.padding!r} ({layer.padding_mode}); "
                             "the ONNX export takes convolutions with numeric zero padding only")
    for name, p in model.named_parameters():
        if p.dtype != torch.float32:
            raise IsvitError(f"parameter {name} is {p.dtype}: the ONNX export takes float32 models only")


# ---------------------------------------------------------------------------------------------
# Stage 1: trace the model, quantized layers as placeholders
# ---------------------------------------------------------------------------------------------

@contextmanager
def exporting_layers(model: nn.Module):
    """While inside, each quantized layer of ``model`` returns a placeholder node named after it."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
    for name, layer in found:
        layer.onnx_name = name
    try:
        yield
    finally:
        for _, layer in found:
            layer.onnx_name = None


def trace(model: nn.Module, input_size) -> onnx.ModelProto:
    """The model as an ONNX graph with a dynamic batch, quantized layers left as placeholders."""
    if not hasattr(torch.onnx, "ops"):
        raise IsvitError(f"the ONNX export needs torch 2.8 or later (torch.onnx.ops), this is torch {torch.__version__}")
    require("onnxscript")  # the dynamo exporter's ONNX builder
    device = next(model.parameters()).device
    example = torch.zeros(2, *input_size, device=device)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch")
    with exporting_layers(model), torch.no_grad():
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
# Stage 2, building blocks: nodes and initializers; weights; activations; post-Softmax maps
# ---------------------------------------------------------------------------------------------

class _Builder:
    """New nodes and initializers for one graph, named after the layer they belong to."""

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


@dataclass(frozen=True)
class Grid:
    """One uniform per-tensor grid: ``x^ = (clamp(round(x / scale) + zero_point, 0, levels - 1) - zero_point) * scale``."""

    scale: np.float32
    zero_point: int
    levels: int

    @property
    def uint8_zero_point(self) -> int | None:
        """The zero point of a uint8 QDQ pair that carries this grid exactly (codes shifted by
        ``max(z, 0) - z``), or None where uint8 cannot hold the grid's codes."""
        z = self.zero_point
        return max(z, 0) if self.levels - 256 <= z <= 255 else None


def tensor_grid(q: UniformQuantizer) -> Grid:
    """A per-tensor quantizer's grid, its scale clamped as its forward clamps it."""
    return Grid(np.float32(_f32(q.scale.clamp_min(1e-8)).reshape(-1)[0]), int(q.zero_point.reshape(-1)[0]), q.levels)


# -- weights ----------------------------------------------------------------------------------

def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit codes as ``bits`` bit planes of 8 codes a byte: (bits, ceil(n / 8)) uint8,
    plane p holding bit p of each code, the first code in each byte's lowest bit."""
    flat = codes.reshape(-1).astype(np.uint8)
    padded = np.zeros(-(-flat.size // 8) * 8, np.uint8)
    padded[:flat.size] = flat
    return np.stack([np.packbits((padded >> p) & 1, bitorder="little") for p in range(bits)])


def unpack_bits(b: _Builder, planes: np.ndarray, shape: tuple[int, ...]) -> str:
    """Nodes computing the int32 codes of ``pack_bits``' planes, in ``shape``: integer arithmetic on
    constants, which the runtimes fold when they load the file."""
    bits, groups = planes.shape
    count = int(np.prod(shape))
    x = b.op("Cast", [b.constant("planes", planes.reshape(bits, groups, 1))], to=6)  # INT32
    x = b.op("Mod", [b.op("Div", [x, b.constant("bit_value", (2 ** np.arange(8, dtype=np.int32)).reshape(1, 1, 8))]),
                     b.constant("two", np.int32(2))])
    x = b.op("Mul", [x, b.constant("plane_value", (2 ** np.arange(bits, dtype=np.int32)).reshape(bits, 1, 1))])
    # keepdims: OpenVINO 2026.4 drops a Reshape to (1, n) that follows a ReduceSum without them
    x = b.op("ReduceSum", [x, b.constant("plane_axis", np.array([0], np.int64))], keepdims=1)
    if groups * 8 != count:  # the last byte's padding codes go
        x = b.op("Reshape", [x, b.constant("flat", np.array([groups * 8], np.int64))])
        x = b.op("Slice", [x, b.constant("start", np.array([0], np.int64)), b.constant("end", np.array([count], np.int64))])
    return b.op("Reshape", [x, b.constant("shape", np.array(shape, np.int64))])


def weight_operand(b: _Builder, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int,
                   axis: int | None) -> tuple[str, bool]:
    """(The dequantized weight, whether an integer kernel can take it) from its integer codes (any
    layout; ``axis``: the dimension of the per-channel ``scale`` and ``zero_point``, None for one of
    each), in the form the module docstring describes: int8 ``q - z`` without zero point, uint8 ``q``
    with it, or int32 ``q - z``; packed to ``bits`` bits below 8."""
    shape = [1] * codes.ndim
    if axis is not None:
        shape[axis] = -1
    zero_point = zero_point.astype(np.int64).reshape(shape if axis is not None else ())
    signed = codes.astype(np.int64) - zero_point
    per_channel = {"axis": axis} if axis is not None else {}
    scale_c = b.constant("scale", scale.astype(np.float32).reshape(-1 if axis is not None else ()))
    if np.abs(signed).max(initial=0) <= MAX_SIGNED_WEIGHT:
        form, kept_zero_point = np.int8, None
    elif zero_point.min() >= 0 and zero_point.max() <= 255:
        form, kept_zero_point = np.uint8, zero_point.astype(np.uint8)
    else:  # int32 carries any zero point: store q - z, dequantized without one
        return b.op("DequantizeLinear", [b.constant("codes_minus_zero_point", signed.astype(np.int32)), scale_c],
                    **per_channel), False
    if bits < 8:
        stored = unpack_bits(b, pack_bits(codes, bits), codes.shape)
        if form is np.int8:
            stored = b.op("Sub", [stored, b.constant("zero_point", zero_point.astype(np.int32))])
        stored = b.op("Cast", [stored], to=3 if form is np.int8 else 2)  # INT8 / UINT8
    else:
        stored = b.constant("codes", (signed if form is np.int8 else codes).astype(form))
    inputs = [stored, scale_c]
    if kept_zero_point is not None:
        inputs.append(b.constant("zero_point", kept_zero_point.reshape(-1 if axis is not None else ())))
    return b.op("DequantizeLinear", inputs, **per_channel), True


def weight_grid(layer: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """(codes, scale, zero point, per-channel axis) of a layer's weight as its quantizer rounds it."""
    q = layer.weight_quantizer
    codes = q.codes(layer.weight.detach()).cpu().numpy()
    scale, zero_point = _f32(q.scale.clamp_min(1e-8)), _f32(q.zero_point)
    return codes, scale, zero_point, (0 if q.is_per_channel else None)


# -- activations ------------------------------------------------------------------------------

def activation_operand(b: _Builder, grid: Grid, x: str) -> str:
    """``x`` on ``grid``: ``(Clip ->) QuantizeLinear -> DequantizeLinear`` (uint8), or where uint8
    cannot hold the grid, its float arithmetic."""
    zp = grid.uint8_zero_point
    if zp is None:
        return float_activation(b, np.float32(grid.scale), np.float32(grid.zero_point), grid.levels, x)
    scale_c = b.constant("scale", np.float32(grid.scale))
    zp_c = b.constant("zero_point", np.uint8(zp))
    if grid.levels < 256:  # QuantizeLinear saturates at 0..255: keep the codes in the b-bit range exactly
        low = (np.float32(0) - np.float32(grid.zero_point)) * grid.scale
        high = (np.float32(grid.levels - 1) - np.float32(grid.zero_point)) * grid.scale
        x = b.op("Clip", [x, b.constant("low", np.float32(low)), b.constant("high", np.float32(high))])
    return b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale_c, zp_c]), scale_c, zp_c])


def float_activation(b: _Builder, scale: np.ndarray, zero_point: np.ndarray, levels: int, x: str) -> str:
    """The PyTorch arithmetic of a uniform grid (per tensor, or per channel on the last dimension)."""
    scale_c = b.constant("scale", scale.astype(np.float32))
    zp_c = b.constant("zero_point", zero_point.astype(np.float32))
    code = b.op("Add", [b.op("Round", [b.op("Div", [x, scale_c])]), zp_c])
    code = b.op("Clip", [code, b.constant("low", np.float32(0)), b.constant("high", np.float32(levels - 1))])
    return b.op("Mul", [b.op("Sub", [code, zp_c]), scale_c])


def split_groups(q: UniformQuantizer) -> tuple[Grid, Grid, np.ndarray] | None:
    """(main grid, outlier grid, outlier channel indices) of a grid with outlier channels of their own
    (exactly two distinct (scale, zero point) pairs), else None. The pair most channels share is main."""
    if not q.is_per_channel:
        return None
    scale, zero_point = _f32(q.scale.clamp_min(1e-8)), _f32(q.zero_point)
    pairs, inverse, counts = np.unique(np.stack([scale, zero_point], 1), axis=0, return_inverse=True, return_counts=True)
    if len(pairs) != 2:
        return None
    main = int(np.argmax(counts))
    grids = [Grid(np.float32(s), int(z), q.levels) for s, z in pairs]
    return grids[main], grids[1 - main], np.flatnonzero(inverse.reshape(-1) != main)


# -- post-Softmax maps ------------------------------------------------------------------------

def sulq_operand(b: _Builder, q: SULQuantizer, x: str) -> str:
    """SULQ's code ``clamp(round((log2(x + eta) - ymin) / step), 0, L-1)``, its value
    ``2^(code step + ymin) - eta``, folded onto uint8 (``table_step``)."""
    eta, ymin, ymax = (float(t.reshape(-1)[0]) for t in (q.eta, q.ymin, q.ymax))
    step = (ymax - ymin) / (q.levels - 1)
    ln2 = math.log(2.0)
    y = b.op("Log", [b.op("Add", [x, b.constant("eta", np.float32(eta))])])
    code = b.op("Add", [b.op("Mul", [y, b.constant("per_step", np.float32(1 / (step * ln2)))]),
                        b.constant("offset", np.float32(-ymin / step))])
    code = b.op("Clip", [b.op("Round", [code]), b.constant("low", np.float32(0)), b.constant("high", np.float32(q.levels - 1))])
    value = b.op("Exp", [b.op("Add", [b.op("Mul", [code, b.constant("step_ln", np.float32(step * ln2))]),
                                      b.constant("ymin_ln", np.float32(ymin * ln2))])])
    value = b.op("Sub", [value, b.constant("eta", np.float32(eta))])
    return activation_operand(b, Grid(np.float32(table_step(q)), 0, 256), value)


def log2sqrt2_operand(b: _Builder, q: LogSqrt2Quantizer, x: str) -> str:
    """log-sqrt2's code ``round(-2 log2(max(x, 1e-20) / delta))``, its value ``delta 2^(-code / 2)``
    (0 past the last code), folded onto uint8 (``table_step``)."""
    delta = float(q.delta.reshape(-1)[0])
    levels, ln2 = q.levels, math.log(2.0)
    y = b.op("Log", [b.op("Max", [x, b.constant("tiny", np.float32(1e-20))])])
    code = b.op("Round", [b.op("Add", [b.op("Mul", [y, b.constant("minus_two_per_ln2", np.float32(-2 / ln2))]),
                                       b.constant("offset", np.float32(2 * math.log2(delta)))])])
    # Codes past the last one (L and above) dequantize to 0: clipped to L, whose value delta 2^(-L/2)
    # is below half a step of the uint8 grid from 5 bits on; at 4 bits or fewer the value is
    # multiplied by clip(L - code, 0, 1), 0 for code L only (onnxruntime's Where costs ten times more).
    clipped = b.op("Clip", [code, b.constant("low", np.float32(0)), b.constant("high", np.float32(levels))])
    value = b.op("Exp", [b.op("Add", [b.op("Mul", [clipped, b.constant("minus_half_ln2", np.float32(-ln2 / 2))]),
                                      b.constant("ln_delta", np.float32(math.log(delta)))])])
    if TABLE_CODES * 2.0 ** (-levels / 2) >= 0.5:
        inside = b.op("Clip", [b.op("Sub", [b.constant("levels", np.float32(levels)), clipped]),
                               b.constant("low", np.float32(0)), b.constant("one", np.float32(1))])
        value = b.op("Mul", [value, inside])
    return activation_operand(b, Grid(np.float32(table_step(q)), 0, 256), value)


def table_step(q: SULQuantizer | LogSqrt2Quantizer) -> float:
    """The step of the uint8 grid a post-Softmax quantizer's table is folded onto: the table's
    largest value is code 255 (zero point 0), as a float32."""
    top = q.table().max() if isinstance(q, SULQuantizer) else q.delta.reshape(-1)[0]
    return float(np.float32(float(top) / TABLE_CODES))


@contextmanager
def folded_tables(model: nn.Module):
    """While inside, ``model``'s post-Softmax quantizers (SULQ, log-sqrt2) give their values folded
    onto the uint8 grid of the export, ``round(x^ / step) * step``: the PyTorch model then computes
    what its ONNX file computes, which is how the fold's own effect is measured."""
    def fold(step: float):
        return lambda module, inputs, out: torch.round(out / step) * step

    hooks = [q.register_forward_hook(fold(table_step(q)))
             for _, q in named_quantizers(model) if isinstance(q, (SULQuantizer, LogSqrt2Quantizer))]
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()


def operand(b: _Builder, q: nn.Module, x: str) -> tuple[str, bool]:
    """(``x`` as the product reads it, whether that is an integer operand) for an activation
    quantizer of any kind."""
    if isinstance(q, SULQuantizer):
        return sulq_operand(b, q, x), True
    if isinstance(q, LogSqrt2Quantizer):
        return log2sqrt2_operand(b, q, x), True
    if isinstance(q, UniformQuantizer) and not q.is_per_channel:
        grid = tensor_grid(q)
        return activation_operand(b, grid, x), grid.uint8_zero_point is not None
    if isinstance(q, UniformQuantizer):
        return float_activation(b, _f32(q.scale.clamp_min(1e-8)), _f32(q.zero_point), q.levels, x), False
    return x, False  # no quantizer: a float input


# ---------------------------------------------------------------------------------------------
# Stage 2: each quantized layer's form
# ---------------------------------------------------------------------------------------------

def lower_linear(b: _Builder, layer: QuantLinear, x: str, output: str, rank: int) -> list[str]:
    """``x W^T + b`` as integer products (see the module docstring); returns each product's form."""
    codes, scale, zero_point, axis = weight_grid(layer)
    codes_t, axis_t = codes.T, (None if axis is None else 1)  # MatMul reads the weight as (in, out)
    if rank == 2:  # onnxruntime would fuse a 2-d MatMul + Add into a float Gemm first
        x = b.op("Unsqueeze", [x, b.constant("axis", np.array([1], np.int64))])
    split = split_groups(layer.input_quantizer) if isinstance(layer.input_quantizer, UniformQuantizer) else None
    bits = layer.weight_quantizer.bits
    if split is None:
        x_op, x_integer = operand(b, layer.input_quantizer, x)
        w, w_integer = weight_operand(b, codes_t, scale, zero_point, bits, axis_t)
        y = b.op("MatMul", [x_op, w])
        forms = [_form(x_integer and w_integer)]
    else:  # outlier channels: their columns of the weight leave the main product for a second one
        main, outliers, index = split
        main_codes = codes_t.copy()
        main_codes[index, :] = np.round(zero_point).astype(codes_t.dtype).reshape(1, -1)  # q = z: weight 0
        w_main, main_integer = weight_operand(b, main_codes, scale, zero_point, bits, axis_t)
        y_main = b.op("MatMul", [activation_operand(b, main, x), w_main])
        x_out = b.op("Gather", [x, b.constant("outlier_channels", index.astype(np.int64))], axis=-1)
        w_out, out_integer = weight_operand(b, codes_t[index, :], scale, zero_point, bits, axis_t)
        y_out = b.op("MatMul", [activation_operand(b, outliers, x_out), w_out])
        y = b.op("Add", [y_main, y_out])
        forms = [_form(main_integer and main.uint8_zero_point is not None),
                 _form(out_integer and outliers.uint8_zero_point is not None)]
    if rank == 2:
        y = b.op("Squeeze", [b.op("Add", [y, b.constant("bias", _f32(layer.bias))]),
                             b.constant("axis", np.array([1], np.int64))], output)
    else:
        b.op("Add", [y, b.constant("bias", _f32(layer.bias))], output)
    return forms


def _form(integer: bool) -> str:
    return "integer" if integer else "float"


def lower_matmul(b: _Builder, layer: QuantMatMul, a: str, other: str, output: str) -> list[str]:
    """``a^ @ b^``: both operands quantized (uint8 QDQ; the post-Softmax tables folded onto uint8)."""
    a_op, a_integer = operand(b, layer.a_quantizer, a)
    b_op, b_integer = operand(b, layer.b_quantizer, other)
    b.op("MatMul", [a_op, b_op], output)
    return [_form(a_integer and b_integer)]


def lower_conv(b: _Builder, layer: QuantConv2d, x: str, output: str) -> list[str]:
    """The convolution on the float image with the dequantized weight codes."""
    codes, scale, zero_point, axis = weight_grid(layer)
    w, _ = weight_operand(b, codes, scale, zero_point, layer.weight_quantizer.bits, axis)
    inputs = [x, w] + ([b.constant("bias", _f32(layer.bias))] if layer.bias is not None else [])
    b.op("Conv", inputs, output, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
         pads=[*layer.padding, *layer.padding], dilations=list(layer.dilation), group=layer.groups)
    return ["float"]


def lower_layers(proto, model: nn.Module) -> dict[str, int]:
    """Replace every placeholder of ``proto`` (in place) by its layer's form; returns how many matrix
    products (and convolutions) of each form the graph now holds: 'integer' or 'float'."""
    from onnx import helper

    layers = dict(model.named_modules())
    graph = proto.graph
    nodes, counts = [], {"integer": 0, "float": 0}
    for node in graph.node:
        if node.domain != ONNX_PLACEHOLDER_DOMAIN or node.op_type not in ONNX_PLACEHOLDER_OPS:
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = attributes["name"].decode()
        layer = layers[name]
        b = _Builder(name)
        if isinstance(layer, QuantLinear):
            forms = lower_linear(b, layer, node.input[0], node.output[0], int(attributes["rank"]))
        elif isinstance(layer, QuantMatMul):
            forms = lower_matmul(b, layer, node.input[0], node.input[1], node.output[0])
        else:
            forms = lower_conv(b, layer, node.input[0], node.output[0])
        nodes.extend(b.nodes)
        graph.initializer.extend(b.initializers)
        for form in forms:
            counts[form] += 1
    for node in nodes:  # the tracer's debug notes (stack traces, FX nodes): a fifth of a W4 file
        del node.metadata_props[:]
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
    an ONNX model in QDQ form, atomically. Returns how many matrix products (and convolutions) of
    the file are integer and how many float (``lower_layers``); both 0 for a full-precision model."""
    onnx = require("onnx")
    check_exportable(model)
    if config is None and named_quantizers(model):
        raise IsvitError("the model is quantized: give its QuantConfig to export it")
    if config is not None and not named_quantizers(model):
        raise IsvitError("the model has no quantizers: quantize it before exporting it with a QuantConfig")
    model = model.eval()
    proto = trace(model, data_config["input_size"])
    counts = lower_layers(proto, model)
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "model_args": json.dumps(model_args or {}),
        "config": json.dumps(applied_config(model, config).to_dict() if config is not None else None),
        "data_config": json.dumps(data_config),
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    return counts
