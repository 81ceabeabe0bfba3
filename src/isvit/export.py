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

The forms (format ``isvit-onnx-v1``), for grids of ``L = 2^b`` levels, are the graphs the runtimes'
int8 fast paths take: every product is ``DequantizeLinear(activation codes) x DequantizeLinear(int8
codes without zero point)``, which onnxruntime fuses into ``MatMulIntegerToFloat`` / ``QLinearMatMul``
and OpenVINO into its int8 FullyConnected and its int8 attention (both of its operands without zero
point, the right one signed):

- weights (uniform, per output channel, scale s and zero point z): int8 without zero point
  (``signed_weight``): the codes ``q - z`` wherever they fit int8 (every grid of 7 bits or fewer
  whose zero point lies on it), exact; an 8-bit channel not centred on 128 is rounded again onto
  the symmetric grid of step ``max |w^| / 127`` (within half that step). Below 8 bits the codes are
  stored packed to b bits (bit planes of the unsigned codes in uint8 initializers, ``pack_bits``)
  and unpacked by integer arithmetic on constants (``Div``, ``Mod``, ``Mul``, ``ReduceSum``, ``Sub
  z``, ``Cast``), which both runtimes fold into plain int8 weights when they load the file: a W4
  file holds 4 bits a weight, a W3 file 3. (Bit shifts would be the natural unpacking; OpenVINO
  2026.4 does not fold them and then computes the product wrongly.) A Linear's weight is stored
  as its MatMul reads it, transposed (in, out);
- a Linear's input (uniform, per tensor): ``QuantizeLinear -> DequantizeLinear`` (uint8) with the
  scale and the zero point ``max(z, 0)``, after a ``Clip`` to the grid's range ``[(0 - z) s,
  (L - 1 - z) s]`` below 8 bits, so that the codes are exactly the b-bit ones (``QuantizeLinear``
  alone saturates at 0..255). A zero point below 0 is shifted to 0: the same values, codes
  ``q - z``. Only a range uint8 cannot hold even shifted (z > 255, or z < L - 256) is written as
  the PyTorch arithmetic (``Div s, Round, Add z, Clip 0..L-1, Sub z, Mul s``) and its product runs
  in float;
- the operands of a product of two activations (q @ k^T, attn @ v): int8 codes without zero point
  (``signed_activation_operand``), exact below 8 bits; an 8-bit grid is re-centred on zero when its
  zero point lies within ``MAX_RECENTRE`` codes of 128 (the same step, the codes beyond -128..127
  saturate), otherwise it stays uint8 with its zero point (integer on onnxruntime, float on OpenVINO);
- outlier channels on a grid of their own (two (scale, zero point) pairs, ``search_split_range``):
  two integer products summed, ``x W^T = Q_main(x) W_main^T + Q_out(x[:, idx]) W[:, idx]^T``, the
  outlier columns of ``W_main`` zero (a ``Gather`` takes the few outlier channels). Any other
  per-channel activation grid (Swin keeps one before qkv where it pads its windows) cannot go into
  an integer product along its reduced dimension: its PyTorch arithmetic and a float product;
- post-Softmax SULQ and log-sqrt2 at 8 bits (``softmax8="uniform"``, the default): the map itself
  on the uint8 grid of step ``t_max / 255`` (``t_max`` the largest value of the method's table), one
  QDQ pair. Below 8 bits (or with ``softmax8="method"``): the method's code from its arithmetic in
  elementwise ops (``Add eta, Log, Mul, Add, Round, Clip``; log-sqrt2: ``Max 1e-20, Log, Mul, Add,
  Round, Clip 0..L``), its value ``Exp(code * a + c)`` (``- eta``; log-sqrt2: 0 past the last code,
  a mask at 4 bits or fewer), then ``QuantizeLinear -> DequantizeLinear`` on that uint8 grid: the
  table of the L values folded onto uint8, each value moved by at most half a step (``t_max / 510``);
- a Linear on a 2-d input (the head): unsqueezed to 3-d around its MatMul, because onnxruntime
  fuses a 2-d MatMul + Add into a float ``Gemm`` before it looks for integer products;
- the patch-embedding Conv: its weight's int8 codes and ``DequantizeLinear``; the image is not
  quantized, so the convolution runs in float.

The re-expressions (8-bit weights rounded again, 8-bit attention operands re-centred, the 8-bit
post-Softmax map on the uint8 grid or the table folded onto it) are what ``folded_tables`` gives the
PyTorch model, so that their effect is measured on their own (docs/onnx.md).

ONNX has no log2, so the two log-domain quantizers compute ``ln(x) / ln 2`` (folded into one ``Mul``):
where that lands within a rounding error of a code boundary, the code can differ by one from
PyTorch's ``log2``.

``metadata_props``: ``format`` (``isvit-onnx-v1``), ``model`` (timm architecture), ``model_args``,
``config`` (the method's config, ``config.to_dict()``, ``null`` for a full-precision export), ``data_config`` (the
preprocessing) and ``export`` (the export's own options: ``softmax8``), all JSON strings except the
first two. The input is ``images`` (N, 3, H, W) float32
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
from .config import Config
from .errors import IsvitError
from .modules import ONNX_PLACEHOLDER_DOMAIN, ONNX_PLACEHOLDER_OPS, QuantConv2d, QuantLinear, QuantMatMul
from .pipeline import applied_config
from .quantizers import LogSqrt2Quantizer, SULQuantizer, UniformQuantizer, is_weight_quantizer, named_quantizers
from .runtime import FORMAT, INPUT_NAME, OUTPUT_NAME, OnnxModel, load_onnx, require  # noqa: F401 (load_onnx: public here too)

if TYPE_CHECKING:
    import onnx

EXPORTABLE_QUANTIZERS = (UniformQuantizer, SULQuantizer, LogSqrt2Quantizer)
QUANTIZED_LAYERS = (QuantLinear, QuantConv2d, QuantMatMul)
# The signed 8-bit codes that weights and the second operand of an activation product are stored as:
# both runtimes' int8 kernels take that operand symmetric (no zero point).
INT8_MIN, INT8_MAX = -128, 127
# An 8-bit activation grid that must be signed (an operand of an attention product) is re-centred
# on zero when its zero point lies within this many codes of 128 (see signed_codes): at most an
# eighth of its codes saturate, at one end, where the calibration put its rarest values.
MAX_RECENTRE = 32
# The uint8 grid that a post-Softmax table is folded onto: its largest value is code 255.
TABLE_CODES = 255
# How an 8-bit post-Softmax grid is exported: "uniform", the map itself on the uint8 grid (one QDQ
# pair: the runtimes' int8 attention kernels), or "method", the method's own code and value (log-domain
# arithmetic on the map), folded onto the same grid. Below 8 bits it is always the method's.
SOFTMAX8_FORMS = ("uniform", "method")


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


def channel_shape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel ``scale`` or ``zero_point`` along ``axis`` of an
    ``ndim``-dimensional weight (``()`` for one value in all)."""
    if axis is None:
        return ()
    return tuple(-1 if d == axis else 1 for d in range(ndim))


def signed_weight(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                  axis: int | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(int8 codes, scale, exact) of a weight as the file stores it: symmetric int8 without zero
    point, what both runtimes' int8 kernels take. Where its codes ``q - z`` fit int8 (every weight
    of 7 bits or fewer whose zero point lies on its grid) they are stored as they are: exact.
    A channel whose ``q - z`` do not fit (an 8-bit grid not centred on 128) is rounded again onto the
    symmetric grid of step ``max |w^| / 127``: within half that step of the PyTorch weight, its
    effect measured in docs/onnx.md; ``exact`` is then False. ``codes`` in any layout, ``axis`` the
    dimension of the per-channel ``scale`` and ``zero_point`` (None for one of each)."""
    shape = channel_shape(codes.ndim, axis)
    scale = scale.astype(np.float32).reshape(shape)
    signed = codes.astype(np.int64) - zero_point.astype(np.int64).reshape(shape)
    reduce = tuple(d for d in range(codes.ndim) if d != axis)
    fits = (signed.min(axis=reduce, keepdims=True) >= INT8_MIN) & (signed.max(axis=reduce, keepdims=True) <= INT8_MAX)
    if fits.all():
        return signed.astype(np.int8), scale, True
    values = signed.astype(np.float32) * scale
    new_scale = np.maximum(np.abs(values).max(axis=reduce, keepdims=True) / np.float32(INT8_MAX), np.float32(1e-8))
    new_scale = np.where(fits, scale, new_scale).astype(np.float32)
    again = np.clip(np.round(values / new_scale), -INT8_MAX, INT8_MAX)
    return np.where(fits, signed, again).astype(np.int8), new_scale.reshape(scale.shape), False


def weight_operand(b: _Builder, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int,
                   axis: int | None, rows: np.ndarray | None = None, zero_rows: np.ndarray | None = None) -> str:
    """The weight as the product reads it, from its integer codes q: int8 without zero point
    (``signed_weight``) dequantized with its scale alone, packed to ``bits`` bits below 8 (bit
    planes of the unsigned codes q, unpacked and shifted by z by integer arithmetic that both
    runtimes fold when they load the file); a weight rounded again is stored as 8-bit codes.
    ``rows`` (indices along the first dimension) keeps only those rows, ``zero_rows`` sets those to
    0: the two parts of a product split by outlier channels, from one ``signed_weight`` of the whole."""
    stored, stored_scale, exact = signed_weight(codes, scale, zero_point, axis)
    z = zero_point.astype(np.int32).reshape(channel_shape(codes.ndim, axis))
    unsigned = codes.astype(np.int32)
    if zero_rows is not None:
        stored, unsigned = stored.copy(), unsigned.copy()
        stored[zero_rows] = 0
        unsigned[zero_rows] = np.broadcast_to(z, unsigned.shape)[zero_rows]  # q = z: weight 0
    if rows is not None:
        stored, unsigned = stored[rows], unsigned[rows]
    per_channel = {"axis": axis} if axis is not None else {}
    scale_c = b.constant("scale", stored_scale.reshape(-1 if axis is not None else ()))
    if bits < 8 and exact:
        unpacked = unpack_bits(b, pack_bits(unsigned, bits), unsigned.shape)
        weight = b.op("Cast", [b.op("Sub", [unpacked, b.constant("zero_point", z)])], to=3)  # INT8
    else:
        weight = b.constant("codes", stored)
    return b.op("DequantizeLinear", [weight, scale_c], **per_channel)


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


def signed_codes(grid: Grid) -> str | None:
    """How ``grid`` can be the signed int8 operand without zero point that OpenVINO's integer
    product of two activations takes: ``"exact"`` where its codes ``q - z`` fit int8 (every grid of
    7 bits or fewer whose zero point lies near it), ``"recentred"`` for an 8-bit grid whose zero
    point lies within ``MAX_RECENTRE`` codes of 128 (the same step, re-centred on zero: the codes
    beyond -128..127 saturate, at most that many at one end; measured in docs/onnx.md), else None."""
    z, levels = grid.zero_point, grid.levels
    if levels - 1 - z <= INT8_MAX and -z >= INT8_MIN:
        return "exact"
    if levels == 256 and abs(z + INT8_MIN) <= MAX_RECENTRE:
        return "recentred"
    return None


def signed_activation_operand(b: _Builder, grid: Grid, x: str) -> str:
    """``x`` on ``grid`` as int8 codes without zero point (``signed_codes`` says when it can):
    ``(Clip ->) QuantizeLinear -> DequantizeLinear`` with zero point 0, the codes ``q - z``, or for a
    re-centred 8-bit grid ``clamp(round(x / s), -128, 127)``. Clipped first where QuantizeLinear's
    saturation at -128..127 is not the grid's range."""
    z, levels = grid.zero_point, grid.levels
    scale = np.float32(grid.scale)
    if signed_codes(grid) == "exact" and (-z, levels - 1 - z) != (INT8_MIN, INT8_MAX):
        low, high = np.float32(-z) * scale, np.float32(levels - 1 - z) * scale
        x = b.op("Clip", [x, b.constant("low", low), b.constant("high", high)])
    scale_c = b.constant("scale", scale)
    zp_c = b.constant("zero_point", np.int8(0))
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


def post_softmax_operand(b: _Builder, q: SULQuantizer | LogSqrt2Quantizer, x: str, softmax8: str) -> str:
    """A post-Softmax map as the product reads it: at 8 bits with ``softmax8="uniform"`` the map
    itself on the uint8 grid of step ``table_step`` (one QDQ pair, the form the runtimes' int8
    attention kernels take), otherwise the method's own code and value folded onto that grid."""
    if softmax8 == "uniform" and q.bits == 8:
        return activation_operand(b, Grid(np.float32(table_step(q)), 0, 256), x)
    if isinstance(q, SULQuantizer):
        return sulq_operand(b, q, x)
    return log2sqrt2_operand(b, q, x)


def table_step(q: SULQuantizer | LogSqrt2Quantizer) -> float:
    """The step of the uint8 grid a post-Softmax quantizer's table is folded onto: the table's
    largest value is code 255 (zero point 0), as a float32."""
    top = q.table().max() if isinstance(q, SULQuantizer) else q.delta.reshape(-1)[0]
    return float(np.float32(float(top) / TABLE_CODES))


@contextmanager
def folded_tables(model: nn.Module, softmax8: str = "uniform"):
    """While inside, ``model`` computes what its ONNX file computes, which is how the export's
    re-expressions are measured on their own: its post-Softmax quantizers (SULQ, log-sqrt2) give
    their values folded onto the uint8 grid, ``round(x^ / step) * step``, or at 8 bits with
    ``softmax8="uniform"`` the map itself on that grid, ``clamp(round(x / step), 0, 255) * step``
    (``post_softmax_operand``); an 8-bit operand of a product of two activations that the export
    re-centres (``signed_codes``) gives ``clamp(round(x / s), -128, 127) * s``."""
    check_softmax8(softmax8)

    def fold(step: float):
        return lambda module, inputs, out: torch.round(out / step) * step

    def on_grid(step: float, low: int, high: int):
        return lambda module, inputs, out: torch.round(inputs[0] / step).clamp(low, high) * step

    hooks = []
    for _, q in named_quantizers(model):
        if isinstance(q, (SULQuantizer, LogSqrt2Quantizer)):
            uniform = softmax8 == "uniform" and q.bits == 8
            step = table_step(q)
            hooks.append(q.register_forward_hook(on_grid(step, 0, TABLE_CODES) if uniform else fold(step)))
    for _, layer in model.named_modules():
        if isinstance(layer, (QuantLinear, QuantConv2d)):
            codes, scale, zero_point, axis = weight_grid(layer)
            stored, stored_scale, exact = signed_weight(codes, scale, zero_point, axis)
            if not exact:
                weight = torch.from_numpy(stored.astype(np.float32) * stored_scale).to(layer.weight.device)
                hooks.append(layer.weight_quantizer.register_forward_hook(lambda m, i, o, w=weight: w.to(o.dtype)))
        if not isinstance(layer, QuantMatMul):
            continue
        for q, role in ((layer.a_quantizer, "left"), (layer.b_quantizer, "right")):
            if isinstance(q, UniformQuantizer) and not q.is_per_channel:
                grid = tensor_grid(q)
                if _signed_role(grid, role) and signed_codes(grid) == "recentred":
                    hooks.append(q.register_forward_hook(on_grid(float(grid.scale), INT8_MIN, INT8_MAX)))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()


def check_softmax8(softmax8: str) -> None:
    if softmax8 not in SOFTMAX8_FORMS:
        raise IsvitError(f"unknown 8-bit post-Softmax form {softmax8!r}: choose {' or '.join(SOFTMAX8_FORMS)}")


def operand(b: _Builder, q: nn.Module, x: str, role: str, softmax8: str = "uniform") -> tuple[str, bool]:
    """(``x`` as the product reads it, whether an integer kernel can take it) for an activation
    quantizer of any kind. ``role``: ``"input"`` of a Linear (uint8 with any zero point: both
    runtimes' Linear kernels take it), or the ``"left"`` or ``"right"`` operand of a product of two
    activations, which OpenVINO runs in integers only when the left one has no zero point and the
    right one is signed without one (``signed_activation_operand``; the left one stays uint8 where
    its zero point is 0, and a grid int8 cannot carry stays uint8 with its zero point: an integer
    product on onnxruntime, a float one on OpenVINO)."""
    if isinstance(q, (SULQuantizer, LogSqrt2Quantizer)):
        return post_softmax_operand(b, q, x, softmax8), True
    if isinstance(q, UniformQuantizer) and not q.is_per_channel:
        grid = tensor_grid(q)
        if _signed_role(grid, role):
            return signed_activation_operand(b, grid, x), True
        return activation_operand(b, grid, x), grid.uint8_zero_point is not None
    if isinstance(q, UniformQuantizer):
        return float_activation(b, _f32(q.scale.clamp_min(1e-8)), _f32(q.zero_point), q.levels, x), False
    return x, False  # no quantizer: a float input


def _signed_role(grid: Grid, role: str) -> bool:
    """Whether an operand in ``role`` on ``grid`` is written as signed int8 codes."""
    if role == "input" or (role == "left" and grid.uint8_zero_point == 0):
        return False
    return signed_codes(grid) is not None


def _axis(b: _Builder, axis: int) -> str:
    return b.constant("axis", np.array([axis], np.int64))


# ---------------------------------------------------------------------------------------------
# Stage 2: each quantized layer's form
# ---------------------------------------------------------------------------------------------

def lower_linear(b: _Builder, layer: QuantLinear, x: str, output: str, rank: int) -> list[str]:
    """``x W^T + b`` as integer products (see the module docstring); returns each product's form."""
    codes, scale, zero_point, axis = weight_grid(layer)
    codes_t, axis_t = codes.T, (None if axis is None else 1)  # MatMul reads the weight as (in, out)
    if rank == 2:  # onnxruntime would fuse a 2-d MatMul + Add into a float Gemm first
        x = b.op("Unsqueeze", [x, _axis(b, 1)])
    split = split_groups(layer.input_quantizer) if isinstance(layer.input_quantizer, UniformQuantizer) else None
    bits = layer.weight_quantizer.bits
    if not isinstance(layer.input_quantizer, EXPORTABLE_QUANTIZERS):
        # A float input (NaFlexVit's patch embedding reads the pixels, as the Conv): a float product
        # with the dequantized weight as a float constant (rows None). As codes, onnxruntime would fuse
        # it into MatMulNBits, which quantizes the float input to int8 on the fly (accuracy level 4).
        parts = [(x, False, None)]
    elif split is None:
        parts = [(*operand(b, layer.input_quantizer, x, "input"), {})]
    else:  # outlier channels: their columns of the weight leave the main product for a second one
        main, outliers, index = split
        x_out = b.op("Gather", [x, b.constant("outlier_channels", index.astype(np.int64))], axis=-1)
        parts = [(activation_operand(b, main, x), main.uint8_zero_point is not None, {"zero_rows": index}),
                 (activation_operand(b, outliers, x_out), outliers.uint8_zero_point is not None, {"rows": index})]
    products, forms = [], []
    for x_op, integer, rows in parts:
        if rows is None:
            weight = b.constant("weight", _f32(layer.weight_quantizer(layer.weight.detach()).T))
        else:
            weight = weight_operand(b, codes_t, scale, zero_point, bits, axis_t, **rows)
        products.append(b.op("MatMul", [x_op, weight]))
        forms.append(_form(integer))
    last = len(products) == 1 and rank != 2
    y = b.op("Add", [products[0], b.constant("bias", _f32(layer.bias))], output if last else None)  # fused into the product
    if len(products) == 2:
        y = b.op("Add", [y, products[1]], output if rank != 2 else None)
    if rank == 2:
        b.op("Squeeze", [y, _axis(b, 1)], output)
    return forms


def _form(integer: bool) -> str:
    return "integer" if integer else "float"


def lower_matmul(b: _Builder, layer: QuantMatMul, a: str, other: str, output: str, softmax8: str = "uniform") -> list[str]:
    """``a^ @ b^``, each operand quantized as ``operand`` says for its side."""
    a_op, a_integer = operand(b, layer.a_quantizer, a, "left", softmax8)
    b_op, b_integer = operand(b, layer.b_quantizer, other, "right", softmax8)
    b.op("MatMul", [a_op, b_op], output)
    return [_form(a_integer and b_integer)]


def lower_conv(b: _Builder, layer: QuantConv2d, x: str, output: str) -> list[str]:
    """The convolution on the float image with the dequantized weight codes."""
    codes, scale, zero_point, axis = weight_grid(layer)
    w = weight_operand(b, codes, scale, zero_point, layer.weight_quantizer.bits, axis)
    inputs = [x, w] + ([b.constant("bias", _f32(layer.bias))] if layer.bias is not None else [])
    b.op("Conv", inputs, output, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
         pads=[*layer.padding, *layer.padding], dilations=list(layer.dilation), group=layer.groups)
    return ["float"]


def lower_layers(proto, model: nn.Module, softmax8: str = "uniform") -> dict[str, int]:
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
            forms = lower_matmul(b, layer, node.input[0], node.input[1], node.output[0], softmax8)
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
    quantize_before_layout_ops(graph)
    _drop_unused_initializers(graph)
    kept = [o for o in proto.opset_import if o.domain != ONNX_PLACEHOLDER_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return counts


ELEMENTWISE_QUANTIZATION = ("Clip", "QuantizeLinear", "DequantizeLinear")
LAYOUT_OPS = ("Transpose", "Reshape")


def quantize_before_layout_ops(graph) -> int:
    """Quantize before a tensor is transposed or reshaped rather than after: each per-tensor
    ``(Clip ->) QuantizeLinear -> DequantizeLinear`` chain that reads a run of ``Transpose`` /
    ``Reshape`` nodes moves above them (``x -> layout -> chain -> y`` becomes ``x -> chain ->
    layout -> y``). Exact: every step of the chain is elementwise with scalar parameters. It is what
    OpenVINO's fusions need: quantized after its transpose, ``k^T`` of ``q @ k^T`` runs as a
    standalone FakeQuantize pushed up onto the 5-d qkv split, in a blocked layout with its reorders,
    instead of inside the int8 attention; the ``proj`` input, quantized before the attention
    output's transpose and reshape, becomes that attention's uint8 output (docs/onnx.md#latency).
    Returns how many chains were moved."""
    scalars = {t.name for t in graph.initializer if not t.dims}
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    def above(node, op_types):  # the node that alone feeds ``node``'s first input, if of op_types
        name = node.input[0]
        found = producer.get(name)
        single = consumers.get(name) == 1 and name not in outputs
        return found if single and found is not None and found.op_type in op_types else None

    moved, stale = [], set()
    for last in graph.node:
        quantize = above(last, ("QuantizeLinear",)) if last.op_type == "DequantizeLinear" else None
        if quantize is None:
            continue
        clip = above(quantize, ("Clip",))
        chain = ([clip] if clip is not None else []) + [quantize, last]
        if not all(set(node.input[1:]) <= scalars for node in chain):
            continue  # per channel: the layout ops would move its axis
        layout = []
        while (node := above((layout or chain)[0], LAYOUT_OPS)) is not None:
            layout.insert(0, node)
        if not layout or (clip is not None and getattr(producer.get(layout[0].input[0]), "op_type", None) == "MatMul"):
            continue  # onnxruntime runs a product whose output is clipped in float (an A3 attn @ v, measured)
        # the chain's and the layout ops' tensors change shape: their recorded shapes are dropped
        stale |= {n.output[0] for n in layout + chain}
        top, y = layout[0].input[0], last.output[0]
        chain[0].input[0] = top
        last.output[0] = y + "/before_layout"
        layout[0].input[0] = last.output[0]
        layout[-1].output[0] = y
        moved.append((layout, last))
    order = list(graph.node)
    for layout, last in moved:  # the layout ops now read the chain's output: placed after it
        for node in layout:
            order.remove(node)
        at = order.index(last) + 1
        order[at:at] = layout
    del graph.node[:]
    graph.node.extend(order)
    kept = [v for v in graph.value_info if v.name not in stale]  # the tracer's shapes, now wrong
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(moved)


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
    config: Config | None,
    data_config: dict,
    model_args: dict | None = None,
    softmax8: str = "uniform",
) -> dict[str, int]:
    """Write ``model`` (quantized by ``isvit.quantize``, or full precision with ``config=None``) as
    an ONNX model in QDQ form, atomically. ``softmax8``: how an 8-bit post-Softmax grid is written
    (``SOFTMAX8_FORMS``). Returns how many matrix products (and convolutions) of the file are
    integer and how many float (``lower_layers``); both 0 for a full-precision model."""
    onnx = require("onnx")
    check_softmax8(softmax8)
    check_exportable(model)
    if config is None and named_quantizers(model):
        raise IsvitError("the model is quantized: give its config to export it")
    if config is not None and not named_quantizers(model):
        raise IsvitError("the model has no quantizers: quantize it before exporting it with a config")
    model = model.eval()
    proto = trace(model, data_config["input_size"])
    counts = lower_layers(proto, model, softmax8)
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "model_args": json.dumps(model_args or {}),
        "config": json.dumps(applied_config(model, config).to_dict() if config is not None else None),
        "data_config": json.dumps(data_config),
        "export": json.dumps({"softmax8": softmax8}),
    }
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    return counts
