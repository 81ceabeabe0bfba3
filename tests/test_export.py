"""ONNX export (isvit.export): each form computes the codes the PyTorch quantizers give (weights and
uniform grids bit for bit, the post-Softmax tables within their stated bound), packed weights
unpack exactly, the runtimes really run the integer kernels the export claims, whole small ViT and
Swin models run in onnxruntime, the file's format and metadata, the CLI's export and eval --onnx,
one-sentence errors, and the real ViT-Ti at W8/A8 on 200 images.

Whole-model tolerance: a quantized network is a step function, so the float rounding differences
between onnxruntime's and PyTorch's LayerNorm, GELU, Softmax and matrix products (~1e-6) move a few
values across a grid boundary, and later layers amplify that (PyTorch's own model changes as much
when its input is perturbed by 1e-6). Exactness is therefore tested per form, on identical
inputs; whole models must agree on the predicted class and differ from PyTorch by well under the
quantization error itself (mean |ONNX - PyTorch| <= half of mean |PyTorch quantized - fp32|).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

import isvit
from isvit.checkpoint import quantized_layers, save_quantized
from isvit.cli import main
from isvit.errors import IsvitError
from isvit.export import (
    FORMAT,
    INT8_MAX,
    LAYOUT_OPS,
    Grid,
    _Builder,
    _signed_role,
    activation_operand,
    export_onnx,
    folded_tables,
    load_onnx,
    log2sqrt2_operand,
    lower_linear,
    pack_bits,
    post_softmax_operand,
    quantize_before_layout_ops,
    signed_activation_operand,
    signed_codes,
    signed_weight,
    sulq_operand,
    table_step,
    tensor_grid,
    unpack_bits,
    weight_operand,
)
from isvit.modules import QuantLinear
from isvit.pipeline import calibrate_activations, calibrate_weights, quantizers
from isvit.quantizers import LogSqrt2Quantizer, SULQuantizer, UniformQuantizer
from isvit.wrap import Placement, wrap_model

from conftest import VAL_BATCH, VAL_DIR, agreement, error_of, random_images, umask
from export_examples import (
    ARCHITECTURES,
    BAD_ONNX,
    TINY,
    VIT,
    data_config,
    export_settings,
    export_tiny_fp32,
    img_size,
    quantized,
    small_model,
)

# What onnxruntime's optimizer makes of an integer product (DequantizeLinear -> MatMul <- DequantizeLinear)
INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul")
FLOAT_KERNELS = ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits", "Conv")


def run_graph(b: _Builder, result: str, inputs: dict[str, torch.Tensor], optimize: bool = False,
              optimized_path: Path | None = None) -> torch.Tensor:
    """The nodes of ``b`` as a graph of their own with float output ``result``, run by onnxruntime
    (``optimized_path``: where to write the graph onnxruntime's optimizer made of it)."""
    nodes = b.nodes + [helper.make_node("Identity", [result], ["y"])]
    graph = helper.make_graph(
        nodes, "one_form",
        # a dynamic first dimension, as every exported file has (onnxruntime fuses more on static shapes)
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *t.shape[1:]]) for name, t in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {name: t.numpy() for name, t in inputs.items()})[0])


def run_activation(q, x: torch.Tensor, optimize: bool = False) -> tuple[torch.Tensor, list[str]]:
    """An activation quantizer's ONNX operand run on ``x``: (output, node types)."""
    b = _Builder("q")
    if isinstance(q, SULQuantizer):
        result = sulq_operand(b, q, "x")
    elif isinstance(q, LogSqrt2Quantizer):
        result = log2sqrt2_operand(b, q, "x")
    else:
        result = activation_operand(b, tensor_grid(q), "x")
    return run_graph(b, result, {"x": x}, optimize), [n.op_type for n in b.nodes]


def run_weight(q: UniformQuantizer, weight: torch.Tensor) -> tuple[torch.Tensor, _Builder]:
    """A weight's ONNX operand, as stored (out, in) with the per-channel axis 0: (the dequantized
    weight, its builder)."""
    b = _Builder("w")
    codes = q.codes(weight).numpy()
    result = weight_operand(b, codes, q.scale.numpy(), q.zero_point.numpy(), q.bits, 0 if q.is_per_channel else None)
    return run_graph(b, result, {}), b


def uniform(bits: int, scale, zero_point) -> UniformQuantizer:
    q = UniformQuantizer(bits)
    q.set_params(torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero_point, dtype=torch.float32))
    return q


def calibrated(q, x: torch.Tensor):
    q.calibrating = True
    with torch.no_grad():
        q(x)
    return q


def attention_maps(n: int = 4, tokens: int = 50, seed: int = 0) -> torch.Tensor:
    """Softmax outputs with a spread like ViT's: a few large values per row, most tiny."""
    logits = 3.0 * torch.randn(n, 3, tokens, tokens, generator=torch.Generator().manual_seed(seed))
    return logits.softmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Activations: uint8 QDQ pairs that carry the PyTorch grid bit for bit
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("optimize", [False, True])
def test_below_8_bits_the_codes_stay_in_the_b_bit_range(bits, optimize):
    # scale 0.5, zero point 3: the 3-bit grid is -1.5 .. 2.0; QuantizeLinear alone would let x = 10
    # through as code 23 (uint8 saturates at 255, not 7).
    q = uniform(bits, 0.5, 3.0)
    x = torch.linspace(-200, 200, 4001)
    got, ops = run_activation(q, x, optimize)
    assert ops == (["Clip"] if bits < 8 else []) + ["QuantizeLinear", "DequantizeLinear"]
    assert torch.equal(got, q(x)) and got.max() == (2 ** bits - 1 - 3) * 0.5 and got.min() == -1.5


@pytest.mark.parametrize("bits, zero_point", [(4, -40.0), (4, -240.0), (8, 0.0), (8, 255.0)])
def test_a_zero_point_below_0_is_shifted_into_uint8(bits, zero_point):
    # -40 at 4 bits: a range that starts above 0 (a post-Softmax map on few tokens), codes 40..55
    q = uniform(bits, 0.01, zero_point)
    x = torch.linspace(-6, 6, 1201)
    got, ops = run_activation(q, x)
    assert "QuantizeLinear" in ops and torch.equal(got, q(x))


@pytest.mark.parametrize("bits, zero_point", [(8, -305.0), (8, 300.0), (4, -250.0)])
def test_a_range_uint8_cannot_hold_is_kept_exactly_as_float_arithmetic(bits, zero_point):
    # -305 at 8 bits: 3.05 .. 5.60; 300: -3.00 .. -0.45; -250 at 4 bits: codes 250..265 after the shift
    q = uniform(bits, 0.01, zero_point)
    x = torch.linspace(-6, 6, 1201)
    got, ops = run_activation(q, x)
    assert "QuantizeLinear" not in ops and ops[-1] == "Mul"
    assert torch.equal(got, q(x))
    assert tensor_grid(q).uint8_zero_point is None


# ---------------------------------------------------------------------------------------------
# Weights: packed codes, int8 without zero point where exact and saturation-free
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(13, 7), (1, 192), (8, 3, 4, 4)])
def test_packed_bits_unpack_exactly_in_onnxruntime(bits, shape):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, shape)
    planes = pack_bits(codes, bits)
    assert planes.dtype == np.uint8 and planes.shape == (bits, math.ceil(codes.size / 8))
    b = _Builder("w")
    result = b.op("Cast", [unpack_bits(b, planes, shape)], to=TensorProto.FLOAT)
    for optimize in (False, True):  # as written, and folded to a constant by onnxruntime
        assert np.array_equal(run_graph(b, result, {}, optimize).numpy(), codes)


def weight_with_rows(bits: int) -> tuple[UniformQuantizer, torch.Tensor]:
    """A calibrated per-row weight quantizer and its weight; row 1 all positive (a zero point below 0)."""
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits))
    weight[1] = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 5.0
    q = UniformQuantizer(bits, per_channel=True, channel_dim=0)
    q.calibrate(weight)
    return q, weight


def weight_file_form(b: _Builder) -> tuple[onnx.NodeProto, dict]:
    (dequantize,) = [n for n in b.nodes if n.op_type == "DequantizeLinear"]
    return dequantize, {t.name: t for t in b.initializers}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_every_weight_is_int8_without_zero_point_and_exact_where_its_codes_fit(bits):
    """q - z fits int8 for every grid of 7 bits or fewer whose zero point lies on it: stored as it
    is (packed below 8 bits), the PyTorch weight bit for bit. An 8-bit row not centred on 128 (and
    row 1, all positive, whose zero point lies below its grid) is rounded again onto the symmetric
    grid of step max|w^| / 127: within half that step of the PyTorch weight."""
    q, weight = weight_with_rows(bits)
    got, b = run_weight(q, weight)
    dequantize, stored = weight_file_form(b)
    assert len(dequantize.input) == 2  # no zero point: symmetric int8, what both runtimes' int8 kernels take
    with torch.no_grad():
        expected = q(weight)
    codes, scale, exact = signed_weight(q.codes(weight).numpy(), q.scale.numpy(), q.zero_point.numpy(), 0)
    signed = q.codes(weight) - q.zero_point.reshape(-1, 1)
    fits = ((signed.amin(1) >= -128) & (signed.amax(1) <= 127)).numpy()
    assert exact == fits.all() and codes.dtype == np.int8
    assert torch.equal(got[fits], expected[fits])
    step = torch.from_numpy(scale).reshape(-1, 1)
    assert torch.all((got - expected).abs() <= step / 2 * (1 + 1e-6))
    assert torch.all(got.abs().amax(1) <= INT8_MAX * step.reshape(-1) * (1 + 1e-6))
    if exact and bits < 8:  # packed: the file holds bits / 8 bytes a weight
        (planes,) = [t for t in b.initializers if "planes" in t.name]
        assert planes.data_type == TensorProto.UINT8 and len(planes.raw_data) == bits * math.ceil(weight.numel() / 8)
    else:
        assert stored[dequantize.input[0]].data_type == TensorProto.INT8


def test_weights_of_7_bits_or_fewer_are_exact_with_any_zero_point_on_their_grid():
    for bits in range(2, 8):
        q, weight = weight_with_rows(bits)
        q.set_params(q.scale, q.zero_point.clamp(0, 2 ** bits - 1))  # any zero point on the grid
        got, _ = run_weight(q, weight)
        with torch.no_grad():
            assert torch.equal(got, q(weight)), bits


def test_an_8_bit_weight_centred_on_128_is_exact():
    q, weight = weight_with_rows(8)
    q.set_params(q.scale, torch.full_like(q.zero_point, 128.0))
    got, _ = run_weight(q, weight)
    with torch.no_grad():
        assert torch.equal(got, q(weight))


# ---------------------------------------------------------------------------------------------
# Operands of products of two activations: int8 without zero point (OpenVINO's integer attention)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, zero_point, form", [
    (3, 3.0, "exact"), (4, 0.0, "exact"), (4, 15.0, "exact"), (4, -40.0, "exact"), (7, 70.0, "exact"),
    (8, 128.0, "exact"), (8, 122.0, "recentred"), (8, 160.0, "recentred"), (8, 95.0, None), (8, 0.0, None),
    (4, -250.0, None)])
def test_signed_operands_are_exact_below_8_bits_and_recentred_near_128(bits, zero_point, form):
    q = uniform(bits, 0.05, zero_point)
    grid = tensor_grid(q)
    assert signed_codes(grid) == form
    if form is None:
        return
    x = torch.linspace(-20, 20, 8001)
    b = _Builder("q")
    got = run_graph(b, signed_activation_operand(b, grid, "x"), {"x": x})
    (quantize,) = [n for n in b.nodes if n.op_type == "QuantizeLinear"]
    zero = {t.name: t for t in b.initializers}[quantize.input[2]]
    assert zero.data_type == TensorProto.INT8 and numpy_helper.to_array(zero) == 0  # no zero point
    if form == "exact":
        assert torch.equal(got, q(x))
    else:  # the same step, re-centred on zero: codes beyond -128..127 saturate
        assert torch.equal(got, torch.round(x / 0.05).clamp(-128, 127) * np.float32(0.05))
        inside = (x >= -min(zero_point, 128) * 0.05) & (x <= min(255 - zero_point, 127) * 0.05)  # on both grids
        assert torch.allclose(got[inside], q(x)[inside]) and not torch.allclose(got, q(x))


def layout_graph(grids: dict[str, Grid], shared: bool = False) -> onnx.ModelProto:
    """``x`` (2, 3, 4, 5) transposed and reshaped, then each of ``grids`` quantizes it (uint8 QDQ,
    clipped below 8 bits) and multiplies it with ``w``, the products summed: the shape of an
    attention output before ``proj``. ``shared``: the transposed tensor is also read elsewhere."""
    b = _Builder("t")
    t = b.op("Transpose", ["x"], perm=[0, 2, 1, 3])
    r = b.op("Reshape", [t, b.constant("shape", np.array([2, 4, 15], np.int64))])
    outputs = [b.op("MatMul", [activation_operand(b, grid, r), "w"]) for grid in grids.values()]
    if shared:
        outputs.append(b.op("ReduceSum", [r], keepdims=1))
    y = outputs[0]
    for other in outputs[1:]:
        y = b.op("Add", [y, other])
    b.op("Identity", [y], "y")
    graph = helper.make_graph(
        b.nodes, "layout",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [15, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return onnx.shape_inference.infer_shapes(model)  # value_info the pass must drop where it moves


def run_model(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, inputs)[0]


@pytest.mark.parametrize("levels", [8, 256])
def test_quantization_moves_above_transposes_and_reshapes_exactly(levels):
    """A per-tensor chain reading a Transpose -> Reshape run moves above it (the form OpenVINO fuses
    into its int8 attention), computing the same values; a tensor another node also reads, or a
    grid per channel, stays where it is."""
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, 3, 4, 5)).astype(np.float32), "w": rng.standard_normal((15, 6)).astype(np.float32)}
    grid = Grid(np.float32(0.07), 3, levels)
    for shared, expected in ((False, 1), (True, 0)):
        model = layout_graph({"a": grid}, shared=shared)
        before = run_model(model, inputs)
        assert quantize_before_layout_ops(model.graph) == expected
        onnx.checker.check_model(model, full_check=True)  # topologically sorted, shapes consistent
        assert np.array_equal(run_model(model, inputs), before)
        types = [n.op_type for n in model.graph.node]
        quantized_first = types.index("DequantizeLinear") < types.index("Transpose")
        assert quantized_first == (expected == 1)
    # two chains on one tensor: neither moves (the reshaped tensor has two readers)
    assert quantize_before_layout_ops(layout_graph({"a": grid, "b": Grid(np.float32(0.1), 0, levels)}).graph) == 0


def test_a_grid_per_channel_does_not_move_above_a_transpose():
    b = _Builder("t")
    t = b.op("Transpose", ["x"], perm=[1, 0])
    scale, zero = b.constant("scale", np.full(3, 0.1, np.float32)), b.constant("zero", np.zeros(3, np.uint8))
    b.op("DequantizeLinear", [b.op("QuantizeLinear", [t, scale, zero], axis=1), scale, zero], "y", axis=1)
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.initializers)
    assert quantize_before_layout_ops(graph) == 0


@pytest.mark.parametrize("kind", [SULQuantizer, LogSqrt2Quantizer])
def test_an_8_bit_post_softmax_map_is_one_uint8_qdq_pair_on_the_table_grid(kind):
    x = attention_maps()
    q = calibrated(kind(8), x)
    b = _Builder("q")
    got = run_graph(b, post_softmax_operand(b, q, "x", "uniform"), {"x": x})
    assert [n.op_type for n in b.nodes] == ["QuantizeLinear", "DequantizeLinear"]  # no Log, no Exp
    step = table_step(q)
    assert torch.equal(got, torch.round(x / step).clamp(0, 255) * np.float32(step))
    b = _Builder("q")  # the method's own form, on request
    got = run_graph(b, post_softmax_operand(b, q, "x", "method"), {"x": x})
    assert "Log" in [n.op_type for n in b.nodes]
    check_post_softmax(q, x, got)


# ---------------------------------------------------------------------------------------------
# Post-Softmax: the log-domain code, its table folded onto uint8
# ---------------------------------------------------------------------------------------------

def table_values(q) -> torch.Tensor:
    """The dequantized value of every code (log-sqrt2: and 0 for the codes past the last)."""
    if isinstance(q, SULQuantizer):
        return q.table()
    return torch.cat([q.delta * torch.exp2(-torch.arange(q.levels) / 2), torch.zeros(1)])


def check_post_softmax(q, x: torch.Tensor, got: torch.Tensor) -> None:
    """The ONNX values are the PyTorch code's table value folded onto uint8 (within half a uint8 step
    of PyTorch's value), except where ln(x) / ln 2 instead of log2 moves a code by one (x within
    float rounding of a code boundary): at most 0.1% of the values, and then the neighbour's."""
    table = table_values(q)
    step = table_step(q)
    folded = torch.round(table / step) * step
    assert (folded - table).abs().max() <= step / 2 * (1 + 1e-5)
    codes, got = q.codes(x).reshape(-1).long(), got.reshape(-1)
    close = lambda c: torch.isclose(got, folded[c.clamp(0, len(table) - 1)], rtol=1e-5, atol=1e-7)
    exact = close(codes)
    assert torch.all(exact | close(codes - 1) | close(codes + 1))
    assert (~exact).float().mean() <= 1e-3


@pytest.mark.parametrize("kind", [SULQuantizer, LogSqrt2Quantizer])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_post_softmax_forms_give_the_pytorch_codes_and_values_within_half_a_uint8_step(kind, bits):
    x = attention_maps()
    q = calibrated(kind(bits), x)
    got, ops = run_activation(q, x)
    assert ops[-2:] == ["QuantizeLinear", "DequantizeLinear"] and "Gather" not in ops
    assert ops.count("Clip") == 1 + (kind is LogSqrt2Quantizer and bits <= 4)  # the code; the mask past the last
    check_post_softmax(q, x, got)
    if kind is LogSqrt2Quantizer:  # values past the last code are exactly 0, in both
        past = q.codes(x).reshape(-1) == q.levels
        assert past.any() == (bits <= 4) and torch.all(got.reshape(-1)[past] == 0)


# ---------------------------------------------------------------------------------------------
# Linear layers: outlier channels as a second integer product; a 2-d input stays integer
# ---------------------------------------------------------------------------------------------

def linear_with_input(bits: int, outlier_ratio: float) -> tuple[QuantLinear, torch.Tensor]:
    """A calibrated QuantLinear (24 -> 10) and an input (3, 17, 24) whose channel 7 reaches 80."""
    x = torch.randn(3, 17, 24, generator=torch.Generator().manual_seed(0))
    x[:, :3, 7] = 80.0
    linear = torch.nn.Linear(24, 10)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(1))
    layer = QuantLinear(linear, UniformQuantizer(bits, per_channel=True, channel_dim=0),
                        UniformQuantizer(bits, outlier_ratio=outlier_ratio))
    layer.weight_quantizer.calibrate(layer.weight.detach())
    calibrated(layer.input_quantizer, x)
    return layer, x


def run_linear(layer: QuantLinear, x: torch.Tensor, tmp_path: Path, optimize: bool) -> tuple[torch.Tensor, list[str]]:
    b = _Builder("linear")
    forms = lower_linear(b, layer, "x", "out", rank=x.dim())
    optimized = tmp_path / "optimized.onnx"
    got = run_graph(b, "out", {"x": x}, optimize, optimized_path=optimized if optimize else None)
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node] if optimize else [n.op_type for n in b.nodes]
    return got, forms, ops


@pytest.mark.parametrize("bits", [4, 8])
def test_outlier_channels_are_a_second_integer_product(bits, tmp_path):
    layer, x = linear_with_input(bits, outlier_ratio=8.0)
    assert layer.input_quantizer.scale.unique().numel() == 2
    with torch.no_grad(), folded_tables(layer):  # an 8-bit weight not centred on 128 is rounded again
        expected = layer(x)
    got, forms, _ = run_linear(layer, x, tmp_path, optimize=False)
    assert forms == ["integer", "integer"]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())
    got, _, ops = run_linear(layer, x, tmp_path, optimize=True)
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


def test_a_linear_on_2d_input_is_an_integer_product(tmp_path):
    """The head reads (N, C): a 2-d MatMul + Add would become onnxruntime's float Gemm."""
    layer, x = linear_with_input(8, outlier_ratio=0.0)
    x = x[:, 0]
    with torch.no_grad(), folded_tables(layer):
        expected = layer(x)
    got, forms, ops = run_linear(layer, x, tmp_path, optimize=True)
    assert forms == ["integer"] and ops.count("MatMulIntegerToFloat") == 1 and "Gemm" not in ops
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Every quantizer of a small model: its operand computes what PyTorch computes on what it sees
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("softmax", ["sulq", "log2sqrt2", "uniform"])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_each_quantizer_of_a_small_model_computes_the_same_in_onnx(arch, bits, softmax):
    """Per-channel post-LayerNorm grids (not folded), the post-Softmax grid named, every weight."""
    model = wrap_model(small_model(arch), Placement(bits, bits, softmax_quantizer=softmax, post_ln_per_channel=True))
    with torch.no_grad():
        calibrate_weights(model)
        calibrate_activations(model, random_images(8, img_size(arch), seed=1))
    seen = {}
    hooks = [q.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
             for name, q in quantizers(model, "activation")]
    with torch.no_grad():
        model(random_images(4, img_size(arch), seed=2))
    for h in hooks:
        h.remove()

    for name, q in quantizers(model, "activation"):
        x, expected = seen[name]
        if isinstance(q, UniformQuantizer) and q.is_per_channel:
            continue  # per-channel grids: the Linear tests above and the whole-model tests below
        got, ops = run_activation(q, x)
        if isinstance(q, UniformQuantizer):
            assert torch.equal(got, expected), name
            assert ("QuantizeLinear" in ops) == (tensor_grid(q).uint8_zero_point is not None), (name, ops)
        else:
            check_post_softmax(q, x, got)

    for name, layer in quantized_layers(model):
        got, _ = run_weight(layer.weight_quantizer, layer.weight.detach())
        with torch.no_grad():
            expected = layer.weight_quantizer(layer.weight)
        codes, scale, exact = signed_weight(layer.weight_quantizer.codes(layer.weight.detach()).numpy(),
                                            layer.weight_quantizer.scale.numpy(),
                                            layer.weight_quantizer.zero_point.numpy(), 0)
        assert torch.equal(got, expected) if exact else \
            torch.all((got - expected).abs() <= torch.from_numpy(scale).reshape(-1, *[1] * (got.dim() - 1)) / 2 * 1.001), name


# ---------------------------------------------------------------------------------------------
# Whole small models exported and run by onnxruntime
# ---------------------------------------------------------------------------------------------

# SULQ at 3 bits (Clip before every QuantizeLinear); uniform post-Softmax with a zero point outside
# uint8 and integer kernels at 8 bits; Swin with padded windows (per-channel post-LayerNorm grids),
# log-sqrt2 and integer kernels. (log-sqrt2 at 4 bits: the command-line tests below.)
EXPORTED = [("vit", "isvit", 3), ("vit", "minmax", 8), ("swin", "repq", 8)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each setting of EXPORTED quantized and exported once."""
    return export_settings(EXPORTED, tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("setting", EXPORTED, ids=[f"{a}-{m}-w{b}" for a, m, b in EXPORTED])
@pytest.mark.parametrize("optimize", [True, False], ids=["ort-optimized", "ort-plain"])
def test_exported_model_computes_what_pytorch_computes(exported, setting, optimize):
    """What the file computes is the PyTorch model with the export's re-expressions (``folded_tables``)."""
    model, _, path, _ = exported[setting]
    arch = setting[0]
    onnx_model, _ = load_onnx(path, threads=1, optimize=optimize)
    x = random_images(16, img_size(arch), seed=3)
    with torch.no_grad(), folded_tables(model):
        expected, fp = model(x), small_model(arch)(x)
        got = onnx_model(x)
    assert got.shape == expected.shape == (16, 10)
    # Measured (AMD EPYC with AVX-512, onnxruntime 1.32, optimized / plain): vit-isvit-w3 16 / 16 equal
    # predictions and |ONNX - PyTorch| 3e-7 / 3e-7 of the quantization error; vit-minmax-w8 16 / 16,
    # 0.08 / 0.08; swin-repq-w8 15 / 16, 0.42 / 1e-5 (its integer kernels round differently).
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 15
    assert (got - expected).abs().mean() <= 0.5 * (expected - fp).abs().mean()
    # the batch is dynamic
    assert onnx_model(x[:1]).shape == (1, 10) and onnx_model(x[:3]).shape == (3, 10)


def products(model) -> int:
    """How many matrix products (and convolutions) the export writes: one per Linear, two where the
    input has outlier channels of their own, one per QuantMatMul and per Conv."""
    count = 0
    for _, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            q = layer.input_quantizer
            count += 2 if isinstance(q, UniformQuantizer) and q.is_per_channel and q.scale.unique().numel() == 2 else 1
        elif isinstance(layer, (isvit.modules.QuantMatMul, isvit.modules.QuantConv2d)):
            count += 1
    return count


@pytest.mark.parametrize("setting", EXPORTED, ids=[f"{a}-{m}-w{b}" for a, m, b in EXPORTED])
def test_exported_file_has_packed_integer_weights_and_metadata(exported, setting):
    model, config, path, counts = exported[setting]
    arch, method, bits = setting
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # no placeholder left
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert not any(n.metadata_props for n in proto.graph.node)  # the tracer's debug notes are gone

    layers = quantized_layers(model)
    initializers = {t.name: t for t in proto.graph.initializer}
    assert not any(f"{name}.weight" in initializers for name, _ in layers)  # no float copy of a quantized weight
    planes = [t for t in proto.graph.initializer if "/planes" in t.name]
    if bits < 8:  # every weight packed: bits / 8 bytes a weight
        assert len(planes) >= len(layers) and all(t.data_type == TensorProto.UINT8 for t in planes)
        weights = sum(layer.weight.numel() for _, layer in layers)
        assert sum(len(t.raw_data) for t in planes) <= bits * weights / 8 + bits * len(planes)
    else:
        assert not planes
    assert counts["integer"] + counts["float"] == products(model)
    assert "Gather" not in [n.op_type for n in proto.graph.node if "attn" in n.name]  # no table lookup
    if bits == 8:  # the post-Softmax map on the uint8 grid: no log-domain arithmetic on it
        assert not {"Log", "Exp"} & {n.op_type for n in proto.graph.node}
    # k of every q @ k^T is quantized before it is transposed, and nothing is left to move
    producer = {out: n for n in proto.graph.node for out in n.output}
    transposed_codes = sum(n.op_type in LAYOUT_OPS and getattr(producer.get(n.input[0]), "op_type", "") == "DequantizeLinear"
                           for n in proto.graph.node)
    assert transposed_codes >= sum(name.endswith(".qk") for name, _ in model.named_modules()) > 0
    assert quantize_before_layout_ops(proto.graph) == 0

    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata["format"] == FORMAT and metadata["model"] == ARCHITECTURES[arch][0]
    assert json.loads(metadata["model_args"]) == ARCHITECTURES[arch][1]
    assert isvit.config_from_dict(json.loads(metadata["config"])) == isvit.config_from_dict(config.to_dict())
    assert json.loads(metadata["data_config"]) == data_config(arch)
    _, info = load_onnx(path, threads=1)
    assert info["config"].method == method and info["config"].w_bits == bits and info["model"] == ARCHITECTURES[arch][0]


def optimized_ops(path: Path, folder: Path) -> collections.Counter:
    """The op types of the graph onnxruntime's optimizer makes of ``path`` (what really runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(folder / "optimized.onnx")).graph.node)


@pytest.mark.parametrize("setting", EXPORTED, ids=[f"{a}-{m}-w{b}" for a, m, b in EXPORTED])
def test_onnxruntime_runs_every_integer_product_on_its_integer_kernels(exported, setting, tmp_path):
    """Counted in the optimized graph: each product the export calls integer is a MatMulIntegerToFloat
    or QLinearMatMul; the float ones (the patch-embedding Conv; Swin's per-channel grid before qkv
    where it pads its windows) are the only float products left."""
    _, _, path, counts = exported[setting]
    ops = optimized_ops(path, tmp_path)
    assert sum(ops[k] for k in INTEGER_KERNELS) == counts["integer"] > 0, dict(ops)
    # (onnxruntime runs a float product with a quantized weight as MatMulNBits: float arithmetic)
    assert sum(ops[k] for k in FLOAT_KERNELS) == counts["float"], dict(ops)
    assert ops["Conv"] == 1


def test_full_precision_model_exports_without_quantizers(tmp_path):
    path = tmp_path / "fp32.onnx"
    model = export_tiny_fp32(path)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(path)).graph.node)
    onnx_model, info = load_onnx(path, threads=1)
    assert info["config"] is None and info["model_args"] == TINY
    x = random_images(4, 32, seed=3)
    with torch.no_grad():
        assert torch.allclose(onnx_model(x), model(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The command line: export a saved model, evaluate it with onnxruntime
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    """A small W4/A4 repq ViT saved as an integer checkpoint with its preprocessing."""
    model, config = quantized("vit", "repq", 4)
    path = tmp_path_factory.mktemp("saved") / "vit_w4a4.safetensors"
    save_quantized(model, path, model_name=VIT[0], config=config, data_config=data_config("vit"), model_args=VIT[1])
    return path


@pytest.fixture(scope="module")
def cli_exported(saved_vit, tmp_path_factory):
    """``isvit export`` of the saved model into a folder that does not exist yet: (path, what it printed)."""
    path = tmp_path_factory.mktemp("cli") / "sub" / "vit_w4a4.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), umask(0o027):
        assert main(["export", "--quantized", str(saved_vit), "--onnx", str(path), "--threads", "1"]) == 0
    return path, printed.getvalue()


def test_cli_export_prints_size_and_quantizers(cli_exported):
    path, printed = cli_exported
    assert path.is_file() and printed.startswith(f"exported {path}: ")
    counts = re.fullmatch(r"exported .*: [0-9.]+ MB \((.*)\)\n", printed).group(1)
    assert counts == "7 integer products, 1 in float (see docs/onnx.md)"  # 4 Linears, 2 attention products, head


@pytest.fixture(scope="module")
def timm_test_vit(tmp_path_factory):
    """timm's smallest ViT (``test_vit``: 6 blocks of width 64, 160x160 images), randomly
    initialised, saved as a safetensors weights file: (model, path)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_cli_export_of_a_full_precision_model(timm_test_vit, tmp_path, capsys):
    model, weights = timm_test_vit
    path = tmp_path / "fp32.onnx"
    assert main(["export", "--model", "test_vit", "--weights", str(weights), "--onnx", str(path), "--threads", "1"]) == 0
    assert capsys.readouterr().out == f"exported {path}: {path.stat().st_size / 1e6:.1f} MB (full precision)\n"
    onnx_model, info = load_onnx(path, threads=1)
    assert info["config"] is None and info["model"] == "test_vit"
    assert info["data_config"] == isvit.resolve_data_config(model)
    x = random_images(2, 160, seed=0)
    with torch.no_grad():
        assert torch.allclose(onnx_model(x), model(x), atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--quantized", "{weights}", "--weights", "{weights}"], "--weights cannot be used with --quantized"),
    (["--model", "test_vit", "--weights", "{missing}"], "does not exist"),
    (["--model", "vit_gigantic_nonsense"], "unknown model 'vit_gigantic_nonsense'"),
    (["--model", "vit_tiny_patch16_224", "--weights", "{weights}"], "does not match VisionTransformer: "),
])
def test_cli_export_refusals_are_one_sentence_and_write_nothing(timm_test_vit, tmp_path, capsys, argv, message):
    names = {"weights": timm_test_vit[1], "missing": tmp_path / "none.safetensors"}
    out = tmp_path / "m.onnx"
    err = error_of(capsys, ["export", *(a.format(**names) for a in argv), "--onnx", str(out)])
    assert message in err and list(tmp_path.iterdir()) == []


def test_cli_export_takes_a_model_or_a_quantized_file_not_both(timm_test_vit, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", "test_vit", "--quantized", str(timm_test_vit[1]), "--onnx", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_file_has_the_umask_permissions(cli_exported):
    path, _ = cli_exported
    assert path.stat().st_mode & 0o777 == 0o640  # 0666 less the umask 027, not a temporary file's 0600
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_cli_export_then_eval_onnx(cli_exported, saved_vit, image_folder, tmp_path, capsys):
    path, _ = cli_exported
    out = tmp_path / "eval.json"
    assert main(["eval", "--onnx", str(path), "--data", str(image_folder), "--batch-size", "3", "--limit", "7",
                 "--threads", "1", "--workers", "0", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "repq" in printed and "4/4" in printed and "onnxruntime" in printed
    result = json.loads(out.read_text())
    assert result["images"] == 7 and result["onnx"] == str(path) and result["method"] == "repq"
    assert result["w_bits"] == 4 and result["a_bits"] == 4 and result["model"] == VIT[0]
    assert result["data_config"] == data_config("vit") and result["device"] == "cpu" and "onnxruntime" in result

    # The same images through the PyTorch model rebuilt from the checkpoint: the same top-1
    model, info = isvit.checkpoint.load_quantized(saved_vit)
    dataset = isvit.ImageFolderDataset(image_folder, isvit.build_transform(info["data_config"]), limit=7)
    expected = isvit.evaluate(model, isvit.make_loader(dataset, batch_size=3, num_workers=0), progress=False)
    assert result["top1"] == expected["top1"] and result["top5"] == expected["top5"]


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence each, from the API and from the CLI
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(BAD_ONNX))
def test_bad_onnx_file_is_one_clear_sentence(cli_exported, image_folder, tmp_path, capsys, case):
    make, message = BAD_ONNX[case]
    path = make(cli_exported[0], tmp_path / "bad.onnx")
    with pytest.raises(IsvitError) as error:
        load_onnx(path, threads=1)
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)
    err = error_of(capsys, ["eval", "--onnx", str(path), "--data", str(image_folder), "--quiet"])
    assert message in err


@pytest.mark.parametrize("extra, message", [
    (["--weights", "w.safetensors"], "--weights cannot be used with --onnx"),
    (["--input-size", "32"], "takes 64x64 images: --input-size cannot change that"),
    (["--device", "meta"], "runs on the CPU with onnxruntime, not on meta"),
])
def test_eval_onnx_refuses_options_that_do_not_apply(cli_exported, image_folder, capsys, extra, message):
    err = error_of(capsys, ["eval", "--onnx", str(cli_exported[0]), "--data", str(image_folder), "--quiet", *extra])
    assert message in err


def test_export_of_a_missing_checkpoint_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    err = error_of(capsys, ["export", "--quantized", str(tmp_path / "none.safetensors"), "--onnx", str(out)])
    assert "does not exist" in err and list(tmp_path.iterdir()) == []


class SymmetricQuantizer(UniformQuantizer):
    """A user's own grid: a uniform quantizer forced to zero point 2^(b-1). Its math is not the
    parent's, so the exporter must not write it as a plain uniform quantizer."""

    def quantize(self, x):
        return super().quantize(x)  # (a real one would change the grid here)


def export_small(model, path, config):
    return export_onnx(model, path, model_name=VIT[0], config=config, data_config=data_config("vit"), model_args=VIT[1])


def test_a_quantizer_without_an_onnx_form_is_refused(tmp_path):
    model, config = quantized("vit", "minmax", 4)
    old = model.blocks[0].mlp.fc2.input_quantizer
    new = SymmetricQuantizer(4)
    new.set_params(old.scale, old.zero_point)
    model.blocks[0].mlp.fc2.input_quantizer = new
    with pytest.raises(IsvitError, match="quantizer blocks.0.mlp.fc2.input_quantizer is a SymmetricQuantizer, "
                                         "which has no ONNX form"):
        export_small(model, tmp_path / "m.onnx", config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spoil, message", [
    (lambda m: isvit.set_quantizers(m, False, "activation"), "is switched off"),
    (lambda m: m.half(), "the ONNX export takes float32 models only"),
    (lambda m: setattr(m.blocks[0].attn.qk, "a_quantizer", UniformQuantizer(4)), "is not calibrated"),
])
def test_unexportable_models_are_refused_and_write_nothing(tmp_path, spoil, message):
    model, config = quantized("vit", "minmax", 4)
    spoil(model)
    with pytest.raises(IsvitError, match=message):
        export_small(model, tmp_path / "m.onnx", config)
    assert list(tmp_path.iterdir()) == []


def test_a_model_the_exporter_cannot_trace_is_one_sentence(tmp_path):
    # a preprocessing that does not fit the model: timm's patch embedding refuses 32x32 images
    model, config = quantized("vit", "minmax", 4)
    with pytest.raises(IsvitError) as error:
        export_onnx(model, tmp_path / "m.onnx", model_name=VIT[0], config=config,
                    data_config={**data_config("vit"), "input_size": [3, 32, 32]}, model_args=VIT[1])
    assert str(error.value).startswith("torch.onnx.export cannot trace the model (") and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(proto, path, *args, **kwargs):
        Path(path).write_bytes(proto.SerializeToString()[:100])  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_tiny_fp32(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The real ViT-Ti at W4/A8 and W8/A8 (isvit, fast preset, one iteration) on 200 validation images
# ---------------------------------------------------------------------------------------------

# Measured on 200 images against PyTorch with its tables folded (Intel Xeon, AVX-512 VNNI/BF16/AMX,
# onnxruntime 1.32, OpenVINO 2026.4.1 at its default precision, 1 thread): W4/A8 top-1 78.0 (folded
# PyTorch) / 77.5 (onnxruntime) / 77.5 (OpenVINO), 198 and 199 of 200 predictions equal, mean / max
# |logit difference| 0.10 / 0.83 and 0.14 / 1.07; W8/A8 82.0 / 82.5 / 82.0, 197 and 200, 0.10 / 0.72
# and 0.13 / 1.16. Unfolded PyTorch differs from the folded model more (W4/A8 76.5, 194 of 200 equal;
# W8/A8 83.0, 191): the fold, measured on 1300 images by benchmarks/onnx_accuracy.py. Logits reach
# ~20. Tolerance: top-1 within 1 point, at least 95% of the predictions equal, mean |logit
# difference| at most 0.3 and max at most 4.
@pytest.fixture(scope="module")
def real_logits(real_exported, val_batches):
    """``real_logits(w_bits, a_bits)``: PyTorch's logits of ``real_exported``'s model on the 200
    images, its post-Softmax tables folded (``folded_tables``): what the file computes. The fold's
    own effect on top-1 is a benchmark's to measure (``benchmarks/onnx_accuracy.py``), on 1300 images:
    on 200 a model one iteration from its calibration can move 2-3 images either way."""
    cache = {}

    def get(w_bits: int, a_bits: int) -> torch.Tensor:
        if (w_bits, a_bits) not in cache:
            model, _, _ = real_exported(w_bits, a_bits)
            with torch.inference_mode(), folded_tables(model):
                cache[w_bits, a_bits] = torch.cat([model(x) for x, _ in val_batches])
        return cache[w_bits, a_bits]

    return get


@pytest.mark.real
@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.openvino)])
@pytest.mark.parametrize("bits", [(4, 8), (8, 8)], ids=["w4a8", "w8a8"])
def test_real_vit_in_each_runtime_matches_pytorch(real_exported, real_logits, val_batches, tmp_path, bits, runtime):
    _, _, path = real_exported(*bits)
    onnx_model, _ = load_onnx(path, threads=1, runtime=runtime)
    expected = real_logits(*bits)
    got = torch.cat([onnx_model(x) for x, _ in val_batches])
    labels = torch.cat([y for _, y in val_batches])
    top1 = {name: 100.0 * (logits.argmax(1) == labels).float().mean().item() for name, logits in
            ((runtime, got), ("pytorch", expected))}
    assert abs(top1[runtime] - top1["pytorch"]) <= 1.0, top1
    assert agreement(got, expected) >= 0.95
    assert (got - expected).abs().mean() <= 0.3 and (got - expected).abs().max() <= 4.0

    # eval --onnx: the same preprocessing and dataset code, so the same top-1 as this session's run
    out = tmp_path / "eval.json"
    assert main(["eval", "--onnx", str(path), "--data", str(VAL_DIR), "--limit", str(VAL_BATCH), "--batch-size",
                 str(VAL_BATCH), "--threads", "1", "--runtime", runtime, "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    first = slice(0, VAL_BATCH)
    assert result["top1"] == pytest.approx(100.0 * (got[first].argmax(1) == labels[first]).sum().item() / VAL_BATCH)
    assert result["images"] == VAL_BATCH and result["method"] == "isvit" and result["w_bits"] == bits[0]
    assert result["runtime"] == runtime


@pytest.mark.real
def test_real_vit_w4_file_is_small_and_every_product_but_the_image_s_is_integer(real_exported, tmp_path):
    """The W4/A8 ViT-Ti file: at most 4.0 MB (weights packed to 4 bits: 2.9 MB of its 3.5), every
    Linear (outlier channels: a second product), q @ k^T, attn @ v and the head on onnxruntime's
    integer kernels."""
    _, _, path = real_exported(4, 8)
    assert path.stat().st_size <= 4.0e6
    ops = optimized_ops(path, tmp_path)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] >= 12 * 6 + 1  # 4 Linears, 2 products a block; head
    assert sum(ops[k] for k in FLOAT_KERNELS) == ops["Conv"] == 1  # the patch embedding on the float image


def signed_attention_blocks(model) -> int:
    """How many blocks of ``model`` have every operand of both attention products in a form
    OpenVINO's integer attention takes (``signed_codes``): the post-Softmax map on uint8 without
    zero point, q, k and v signed without one."""
    count = 0
    for block in model.blocks:
        qk, av = block.attn.qk, block.attn.av
        roles = ((qk.a_quantizer, "left"), (qk.b_quantizer, "right"), (av.b_quantizer, "right"))
        count += all(_signed_role(tensor_grid(q), role) for q, role in roles)
    return count


@pytest.mark.real
@pytest.mark.openvino
@pytest.mark.parametrize("bits", [(4, 8), (8, 8)], ids=["w4a8", "w8a8"])
def test_real_vit_file_runs_every_product_on_openvino_s_int8_kernels(real_exported, bits):
    """OpenVINO runs every Linear of the W4/A8 and W8/A8 ViT-Ti files on its int8 kernels (int8
    weights, no zero point), and the attention products of every block whose operands the export
    writes signed in int8 too (its fused attention, a Subgraph, or two MatMuls), at the precision
    isvit's load_onnx chooses (OpenVINO's default: bf16 where the CPU has it) and at f32; no Log or
    Exp is left on the attention maps at 8 bits. Where the attention is one fused kernel (a
    Subgraph), k enters it without a transpose of its own and its output is already the proj
    input's uint8 codes (the export quantizes before transposes and reshapes:
    quantize_before_layout_ops)."""
    import openvino  # only in the OpenVINO process (conftest.py)

    model, _, path = real_exported(*bits)
    default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()  # bf16 where the CPU has it
    for hint in (None, "f32"):
        ov_model, _ = load_onnx(path, threads=1, runtime="openvino", precision=hint)
        assert ov_model.precision == (hint or default)  # an 8-bit file: OpenVINO's own default
        ov_model(torch.zeros(1, 3, 224, 224))
        ops = ov_model.compiled.get_runtime_model().get_ordered_ops()
        kernels = [(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str),
                    op.get_rt_info()["primitiveType"].astype(str)) for op in ops]
        fully_connected = [kernel for layer, _, kernel in kernels if layer.startswith("FullyConnected")]
        assert len(fully_connected) >= 12 * 4 + 1 and all("i8" in k.lower() for k in fully_connected), fully_connected
        integer_attention = sum(layer == "Subgraph" and precision == "i8" for layer, precision, _ in kernels) \
            + sum(layer == "MatMul" and "i8" in kernel.lower() for layer, _, kernel in kernels) / 2
        assert integer_attention >= signed_attention_blocks(model) >= 6, kernels
        fused = [op for op in ops if op.get_rt_info()["layerType"].astype(str) == "Subgraph"]
        assert all(op.get_output_element_type(0).get_type_name() == "u8" for op in fused), kernels
        split_read = [op for op in ops if op.get_rt_info()["layerType"].astype(str) == "FakeQuantize"
                      and op.input_value(0).get_node().get_rt_info()["layerType"].astype(str) == "Split"]
        assert not split_read  # k's quantizer pushed up onto the qkv split: what a transposed k gave
    assert not {"Log", "Exp"} & {n.op_type for n in onnx.load(str(path)).graph.node}

