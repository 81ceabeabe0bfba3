"""Quantized building blocks that take the place of timm's modules.

Each quantized module holds its quantizers as named children (``input_quantizer``,
``weight_quantizer``, ``a_quantizer``/``b_quantizer``), so they can be listed, enabled and disabled
by name, and their state is part of the model's ``state_dict()``. Weights and biases stay the
original ``nn.Parameter`` objects.

Each family's attention module (in its file under ``isvit/families/``) reimplements the
attention arithmetic explicitly with two ``QuantMatMul`` (timm's fused
``scaled_dot_product_attention`` hides the two matrix products that must be quantized); it is
swapped in for timm's module rather than patching timm's forward functions, and accepts the
arguments of every timm 1.0.x release (``attn_mask``, ``is_causal``, Swin's ``mask``). The pieces
several families share are here: ``additive_mask``, ``window_attention_output``, ``QuantSwiGLU``.

While ``isvit.export`` traces a model for ONNX, each quantized layer (``QuantLinear``,
``QuantConv2d``, ``QuantMatMul``) has ``onnx_name`` set to its name and returns a placeholder node
``isvit::<class name>`` (attributes ``name`` and the input's ``rank``) instead of its arithmetic;
the exporter replaces each by the layer's integer form, built from its quantizers' parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import Quantizer

# The placeholders a quantized layer leaves in the graph while the model is traced for ONNX.
ONNX_PLACEHOLDER_DOMAIN = "isvit"
ONNX_PLACEHOLDER_OPS = ("QuantLinear", "QuantConv2d", "QuantMatMul")


def onnx_placeholder(layer: nn.Module, inputs: tuple[torch.Tensor, ...], shape) -> torch.Tensor:
    """A node ``isvit::<layer class>(inputs)`` with the layer's name and the first input's rank as
    attributes, of the given output ``shape``; only meaningful inside ``torch.onnx.export``."""
    from torch.onnx.ops import symbolic  # torch >= 2.8

    return symbolic(
        f"{ONNX_PLACEHOLDER_DOMAIN}::{type(layer).__name__}", inputs,
        {"name": layer.onnx_name, "rank": inputs[0].dim()}, dtype=inputs[0].dtype, shape=shape, version=1,
    )


class Identity(nn.Identity):
    """Stand-in for an absent quantizer, so every quantized module has the same attributes."""


def _quantizer_or_identity(q: Quantizer | None) -> nn.Module:
    return q if q is not None else Identity()


class QuantLinear(nn.Linear):
    """``y = W^ x^ + b``: input quantizer (optional) and per-output-channel weight quantizer."""

    def __init__(self, linear: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        # Always a bias: the LayerNorm fold and bias correction give every layer one, and a model
        # wrapped afresh must have the same state-dict keys as a quantized one.
        if linear.bias is None:
            self.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype))
        else:
            self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = _quantizer_or_identity(input_quantizer)
        self.onnx_name: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_name is not None:
            return onnx_placeholder(self, (x,), (*x.shape[:-1], self.out_features))
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """Patch-embedding convolution with a per-output-channel weight quantizer (the image stays float)."""

    def __init__(self, conv: nn.Conv2d, weight_quantizer: Quantizer):
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(conv, name))
        self.weight, self.bias = conv.weight, conv.bias
        self.weight_quantizer = weight_quantizer
        self.onnx_name: str | None = None

    def output_shape(self, x: torch.Tensor) -> tuple:
        """(N, C_out, H_out, W_out) for input ``x`` (int padding only, as ``isvit.export`` takes)."""
        sizes = [
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(x.shape[-2:], self.padding, self.dilation,
                                                           self.kernel_size, self.stride)
        ]
        return (x.shape[0], self.out_channels, *sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_name is not None:
            return onnx_placeholder(self, (x,), self.output_shape(x))
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantMatMul(nn.Module):
    """``a^ @ b^`` with one quantizer per operand."""

    def __init__(self, a_quantizer: Quantizer, b_quantizer: Quantizer):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer
        self.onnx_name: str | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.onnx_name is not None:
            return onnx_placeholder(self, (a, b), (*a.shape[:-1], b.shape[-1]))
        return self.a_quantizer(a) @ self.b_quantizer(b)


def additive_mask(attn_mask: torch.Tensor | None, is_causal: bool, n: int, like: torch.Tensor):
    """timm's attention-mask conventions turned into an additive bias (or None)."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def window_attention_output(module: nn.Module, attn: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """The part Swin's two window attentions share, from the scores (B_, heads, N, N) on: the
    shifted-window mask, Softmax, the quantized attn @ v and ``proj``."""
    N = attn.shape[-1]
    if mask is not None:
        num_windows = mask.shape[0]
        attn = attn.view(-1, num_windows, module.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, module.num_heads, N, N)
    attn = module.attn_drop(attn.softmax(dim=-1))
    x = module.av(attn, v).transpose(1, 2).reshape(attn.shape[0], N, -1)
    return module.proj_drop(module.proj(x))


class QuantSwiGLU(nn.Module):
    """timm's ``SwiGLU`` MLP (``fc1_g``, ``fc1_x``, optional sub-LayerNorm ``norm``, ``fc2``) with its
    two input Linears as one ``QuantLinear`` ``fc1`` (gate rows first): both read the same
    post-LayerNorm tokens, which thus have one quantizer, foldable like any other ``fc1``'s."""

    def __init__(self, mlp: nn.Module, fc1: QuantLinear, fc2: QuantLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.act, self.drop1, self.norm, self.drop2 = mlp.act, mlp.drop1, mlp.norm, mlp.drop2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, x = self.fc1(x).chunk(2, dim=-1)
        x = self.drop1(self.act(gate) * x)
        return self.drop2(self.fc2(self.norm(x)))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight + bias`` over the last dimension.

    ``isvit.rotate`` puts it where a LayerNorm read a residual stream made zero-mean: there it
    computes what the LayerNorm did, and unlike a LayerNorm it commutes with a rotation of its input.
    ``weight`` and ``bias`` keep the LayerNorm's names (the post-LayerNorm fold writes into them).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(normalized_shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():  # traced for ONNX: the division onnxruntime fuses into one
            # SimplifiedLayerNormalization kernel (and OpenVINO into its RMS), eight elementwise ops else
            return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight + self.bias
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class RotatedLayerNorm(RMSNorm):
    """A LayerNorm whose input was rotated, with its mean direction rotated along.

    A LayerNorm removes the component of ``x`` along ``u = 1 / sqrt(d)`` (the mean) and divides
    by the RMS of the rest. For an input rotated by an orthogonal ``Q`` (``x' = x Q``) the same is
    ``x' - (x' . v) v`` with ``v = u Q`` (buffer ``direction``, unit length), then the RMSNorm:
    exactly the LayerNorm's normalised output, rotated. Used where the stream cannot be made
    zero-mean exactly (Swin, whose patch merging normalises four tokens at once, ``rotate.py``).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__(normalized_shape, eps, device=device, dtype=dtype)
        direction = torch.full((normalized_shape,), normalized_shape ** -0.5, device=device, dtype=dtype)
        self.register_buffer("direction", direction)  # persistent: a checkpoint carries it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - (x @ self.direction).unsqueeze(-1) * self.direction)


class Unrotate(nn.Module):
    """``x W^T + b`` with constant ``W`` and ``b`` (buffers, float, never quantized): where a rotated
    stream leaves a model that has no Linear to read it (a feature tower, ``num_classes=0``), the
    rotation undone, ``W = diag(gamma) Q`` (the final LayerNorm's affine with it; ``W = Q`` where
    there is none) and ``b = beta``, so ``(x Q) W^T + b = gamma * x + beta`` (``orthogonal.unrotate``).
    Buffers rather than parameters: reconstruction leaves it alone, and a checkpoint carries it."""

    def __init__(self, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.register_buffer("weight", torch.eye(dim, device=device, dtype=dtype))
        self.register_buffer("bias", torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"
