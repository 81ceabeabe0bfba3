"""Fake quantizers: the math of each grid, and how it is fitted to data.

Every quantizer is an ``nn.Module`` whose whole state lives in buffers, so ``state_dict()`` saves it
and ``load_state_dict()`` restores it (buffers are resized on load: a per-channel quantizer turned
per-tensor by the reparameterisation loads into a freshly wrapped model). A quantizer has three
runtime switches, none of which is state:

- ``enabled``: when False the quantizer is the identity;
- ``calibrating``: when True the next forward fits the parameters to the tensor it sees (the
  percentile-MSE search), then quantizes it; the flag clears itself;
- an uncalibrated quantizer that is enabled refuses to run, so a forgotten calibration is an error,
  not silently full precision.

Rounding uses a straight-through estimator, so the block reconstruction can train weights through
the quantizers.

The grids:

- ``UniformQuantizer``: asymmetric, ``q = clamp(round(x / s) + z, 0, 2^b - 1)``,
  ``x^ = (q - z) * s``; per tensor (scale of one element) or per channel along ``channel_dim``.
  With ``outlier_ratio`` a per-tensor grid sets apart the few channels whose values reach far
  beyond the others' (outlier channels): they get a second grid of the same bits, so the grid is
  stored per channel with two distinct (scale, zero point) pairs.
- ``LogSqrt2Quantizer`` (RepQ-ViT, post-Softmax): ``q = clamp(round(-2 log2(x / d)), 0, 2^b - 1)``,
  ``x^ = d * 2^(-q / 2)``, values past the last code become 0.
- ``SULQuantizer`` (I&S-ViT, post-Softmax): ``y = log2(x + eta)``, a uniform grid of 2^b levels
  between ``ymin`` and ``ymax`` in the log domain, ``x^ = 2^(q s + ymin) - eta``. Unlike the
  authors' code, the exponent is not rounded to an integer, so all 2^b levels are distinct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Clipping percentiles searched at initialisation (method.md): the one with the lowest MSE wins.
ACTIVATION_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999, 1.0)
# Lower candidates, searched down to the config's ``act_percentile`` when it is set (at 3-4 bits a
# grid of 8-16 levels gains more from a finer step than it loses by clipping the last 1%).
LOW_ACTIVATION_PERCENTILES: tuple[float, ...] = (0.99, 0.995, 0.998)
WEIGHT_PERCENTILES: tuple[float, ...] = (
    0.97, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999, 1.0,
)
# AdaRound's rectified sigmoid stretches sigmoid(v) to (GAMMA, ZETA), then clamps to [0, 1], so that
# h(v) reaches 0 and 1 exactly (Nagel et al. 2020).
ADAROUND_GAMMA, ADAROUND_ZETA = -0.1, 1.1
# The shift grid of SULQ (method.md).
SULQ_ETAS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# Fake quantization with a straight-through estimator, fused
#
# Each grid is one autograd Function: the forward makes one temporary and works in place on it,
# and saves only what the backward needs (a mask or a per-element factor), instead of the dozen
# intermediate tensors that the same expression written with autograd ops keeps. On the post-Softmax
# maps and the MLP's hidden activations, which dominate the reconstruction's memory traffic, this
# halves the time of a training step on CPU. Without a gradient the same arithmetic runs in place.
#
# Gradients (the codes are rounded with a straight-through estimator):
#   uniform  x^ = (clamp(round(x/s) + z, 0, L-1) - z) s:
#            dx^/dx = 1 where the code is in range, else 0; dx^/ds = (q - z) - [in range] x / s
#   SULQ     x^ = 2^(clamp(round((log2(x + eta) - ymin) / step)) step + ymin) - eta:
#            dx^/dx = (x^ + eta) / (x + eta) where the code is in range, else 0
#   log-sqrt2 x^ = d 2^(-clamp(round(-2 log2(x / d))) / 2), 0 past the last code:
#            dx^/dx = x^ / x where the code is in range, else 0
# ---------------------------------------------------------------------------------------------


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _clamp_in_place(code: torch.Tensor, levels: int, want_mask: bool):
    """Clamp ``code`` to 0..levels-1 in place; with ``want_mask`` also return where it was in range."""
    if not want_mask:
        return code.clamp_(0, levels - 1), None
    clamped = code.clamp(0, levels - 1)
    return clamped, clamped == code


class _UniformFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, levels):
        code = torch.div(x, scale).round_().add_(zero_point)
        code, inside = _clamp_in_place(code, levels, want_mask=True)
        ctx.levels = levels
        ctx.save_for_backward(inside, x if ctx.needs_input_grad[1] else None, scale, zero_point)
        return code.sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        inside, x, scale, zero_point = ctx.saved_tensors
        grad_x = torch.where(inside, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            t = x / scale
            local = t.round().add_(zero_point).clamp_(0, ctx.levels - 1).sub_(zero_point)
            local.sub_(torch.where(inside, t, 0.0))
            grad_scale = (grad * local).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None


def fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, levels: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, 0, levels - 1) - zero_point) * scale`` (broadcast)."""
    if _wants_grad(x, scale):
        return _UniformFakeQuant.apply(x, scale, zero_point, levels)
    code = torch.div(x, scale).round_().add_(zero_point).clamp_(0, levels - 1)
    return code.sub_(zero_point).mul_(scale)


class _ScaledSTE(torch.autograd.Function):
    """Returns ``value``; the gradient to ``x`` is the incoming gradient times ``factor``."""

    @staticmethod
    def forward(ctx, x, value, factor):
        ctx.save_for_backward(factor)
        return value

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None


class _SULQGridFakeQuant(torch.autograd.Function):
    """SULQ with gradients to its grid too (``eta``, ``ymin``, ``step``; each of one element), for
    the end-to-end stage. With z = q step + ymin and u = (log2(x + eta) - ymin) / step, the
    rounding's straight-through estimator (q = u where the code is in range) gives
    d x^/d step = 2^z ln2 (q - [in] u), d x^/d ymin = 2^z ln2 [out], d x^/d eta = [in] 2^z / (x + eta) - 1."""

    @staticmethod
    def forward(ctx, x, eta, ymin, step, levels):
        shifted = x + eta
        u = torch.log2(shifted).sub_(ymin).div_(step)
        code, inside = _clamp_in_place(u.round(), levels, want_mask=True)
        power = code.mul(step).add_(ymin).exp2_()  # 2^z = x^ + eta
        ctx.grid_shape = eta.shape
        ctx.save_for_backward(shifted, u, code, inside, power)
        return power - eta

    @staticmethod
    def backward(ctx, grad):
        shifted, u, code, inside, power = ctx.saved_tensors
        ln2 = math.log(2.0)
        ratio = torch.where(inside, power / shifted, 0.0)
        grad_x = grad * ratio if ctx.needs_input_grad[0] else None
        shape = ctx.grid_shape
        grad_eta = (grad * (ratio - 1)).sum().reshape(shape) if ctx.needs_input_grad[1] else None
        grad_ymin = (grad * torch.where(inside, 0.0, power * ln2)).sum().reshape(shape) if ctx.needs_input_grad[2] else None
        grad_step = None
        if ctx.needs_input_grad[3]:
            grad_step = (grad * power * ln2 * (code - torch.where(inside, u, 0.0))).sum().reshape(shape)
        return grad_x, grad_eta, grad_ymin, grad_step, None


def fake_quant_sulq(x: torch.Tensor, eta, ymin, step, levels: int) -> torch.Tensor:
    """SULQ: ``2^(clamp(round((log2(x + eta) - ymin) / step)) * step + ymin) - eta``."""
    if _wants_grad(eta, ymin, step):
        return _SULQGridFakeQuant.apply(x, eta, ymin, step, levels)
    want_grad = _wants_grad(x)
    with torch.no_grad():
        shifted = x + eta
        code = torch.log2(shifted).sub_(ymin).div_(step).round_()
        code, inside = _clamp_in_place(code, levels, want_grad)
        value = code.mul_(step).add_(ymin).exp2_()
        factor = torch.where(inside, value / shifted, 0.0) if want_grad else None
        value = value.sub_(eta)
    return _ScaledSTE.apply(x, value, factor) if want_grad else value


def fake_quant_log2sqrt2(x: torch.Tensor, delta, levels: int) -> torch.Tensor:
    """log-sqrt2: ``delta * 2^(-clamp(round(-2 log2(x / delta))) / 2)``, 0 past the last code."""
    want_grad = _wants_grad(x)
    with torch.no_grad():
        code = torch.log2(x.clamp_min(1e-20).div_(delta)).mul_(-2).round_()
        past_last = code > levels - 1
        code, inside = _clamp_in_place(code, levels, want_grad)
        value = code.neg_().div_(2).exp2_().mul_(delta).masked_fill_(past_last, 0.0)
        factor = torch.where(inside & (x > 1e-20), value / x, 0.0) if want_grad else None
    return _ScaledSTE.apply(x, value, factor) if want_grad else value


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


class Quantizer(nn.Module):
    """Common switches and the resize-on-load of buffers; subclasses define the grid."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True
        self.calibrating = False
        # QDrop (block reconstruction only): each element keeps its float value with this probability.
        self.qdrop = 0.0

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    @property
    def qdrop(self) -> float:
        return self._qdrop

    @qdrop.setter
    def qdrop(self, p: float) -> None:
        self._qdrop = float(p)
        self._drop_pool = None  # drawn again for the new probability; freed when QDrop is switched off

    def _keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """QDrop's mask, 1.0 where an element keeps its float value: a slice, at a random offset, of
        one pool of random draws twice the tensor's size. Each element is kept with probability
        ``qdrop`` and the mask moves with every call; a fresh draw per element and call cost
        more than the quantization itself (random numbers are slow on a CPU)."""
        n = x.numel()
        pool = self._drop_pool
        if pool is None or pool.numel() < 2 * n or pool.device != x.device or pool.dtype != x.dtype:
            pool = (torch.rand(2 * n, device=x.device) < self._qdrop).to(x.dtype)
            self._drop_pool = pool
        offset = int(torch.randint(pool.numel() - n + 1, ()))
        return pool[offset:offset + n].view(x.shape)

    @property
    def is_calibrated(self) -> bool:
        raise NotImplementedError

    def calibrate(self, x: torch.Tensor) -> None:
        """Fit the parameters to ``x`` (no gradient)."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            with torch.no_grad():
                self.calibrate(x.detach())
            self.calibrating = False
        if not self.is_calibrated:
            raise RuntimeError(f"{type(self).__name__} is enabled but was never calibrated")
        out = self.quantize(x)
        if self._qdrop > 0:
            out = torch.lerp(out, x, self._keep_mask(x))  # exactly x where the mask is 1, out where 0
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A buffer's shape is part of the state (per-tensor vs per-channel): adopt the saved one.
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


def is_weight_quantizer(name: str) -> bool:
    """Whether the quantizer registered under ``name`` quantizes a layer's weight (the wrappers
    name those ``<layer>.weight_quantizer``); every other quantizer quantizes an activation."""
    return name.endswith("weight_quantizer")


def named_quantizers(model: nn.Module, kind: str = "all") -> list[tuple[str, Quantizer]]:
    """The quantizers in ``model`` with their names; ``kind`` is 'all', 'weight' or 'activation'."""
    if kind not in ("all", "weight", "activation"):
        raise ValueError(f"kind must be 'all', 'weight' or 'activation', got {kind!r}")
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Quantizer) and (kind == "all" or (kind == "weight") == is_weight_quantizer(name))
    ]


class UniformQuantizer(Quantizer):
    """Asymmetric uniform quantizer, per tensor or per channel.

    ``channel_dim`` names the channel axis used when the quantizer is calibrated per channel
    (``per_channel=True``). After calibration the granularity is read off the scale's size, so a
    per-channel quantizer can be turned per tensor (the LayerNorm reparameterisation) by
    ``set_params`` with one-element tensors.
    """

    def __init__(
        self,
        bits: int,
        per_channel: bool = False,
        channel_dim: int = -1,
        percentiles: Sequence[float] = ACTIVATION_PERCENTILES,
        outlier_ratio: float = 0.0,
    ):
        super().__init__(bits)
        self.per_channel = per_channel
        self.channel_dim = channel_dim
        self.percentiles = tuple(percentiles)
        # > 0, per tensor only: channels whose largest |x| exceeds this many times the median
        # channel's get a grid of their own (``search_split_range``); 0 is one grid for all.
        self.outlier_ratio = float(outlier_ratio)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))  # integer-valued, kept as float

    @property
    def is_calibrated(self) -> bool:
        return self.scale.numel() > 0

    @property
    def is_per_channel(self) -> bool:
        return self.scale.numel() > 1

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set the grid; ``zero_point`` is rounded to an integer."""
        scale = scale.detach().reshape(-1).float()
        self.scale = scale.clamp_min(1e-8).to(self.scale.device)
        self.zero_point = torch.round(zero_point.detach().reshape(-1).float()).to(self.scale.device)

    # -- learnt step size (LSQ), in the log domain ------------------------------------------------
    # While learnt, the scale is ``scale * exp(log_scale_step)`` with a trainable ``log_scale_step``
    # that starts at 0: one learning rate then means the same relative change for a step of 1e-3
    # and one of 1, and the scale can never turn negative. ``freeze_scale`` folds it back.

    def learnable_scale(self) -> nn.Parameter:
        """Make the scale trainable (as a log-domain factor, see above); returns that parameter."""
        if getattr(self, "log_scale_step", None) is None:
            self.log_scale_step = nn.Parameter(torch.zeros_like(self.scale))
        return self.log_scale_step

    def freeze_scale(self) -> None:
        """Fold the learnt factor into the ``scale`` buffer and drop the parameter."""
        step = self._parameters.pop("log_scale_step", None)
        if step is not None:
            self.scale = (self.scale * step.detach().exp()).clamp_min(1e-8)

    def current_scale(self) -> torch.Tensor:
        step = self._parameters.get("log_scale_step")
        return self.scale if step is None else self.scale * step.exp()

    # -- learnt rounding, for weight quantizers --------------------------------------------------
    # Each weight w (step s, zero point z) may end on its grid's floor(w / s) or the code above;
    # one trainable variable v per weight says which. Two ways to learn it:
    #
    # "adaround" (Nagel et al. 2020; BRECQ, QDrop): w is floor(w / s) + h(v) codes above its floor,
    #   h(v) = clamp(sigmoid(v) (ZETA - GAMMA) + GAMMA, 0, 1) (the rectified sigmoid), v started
    #   where h(v) is w's own fractional part (training starts from the float weight). Soft while
    #   training; a regulariser (``rounding_regulariser``) pushes every h(v) to 0 or 1, and the end
    #   rounds up where v >= 0.
    # "offset" (SignRound-like): w is round(w / s + v) codes with v in [-1/2, 1/2], started at 0
    #   (round to nearest) and trained through the rounding's straight-through estimator: the
    #   forward pass always uses the hard codes, so what is trained is what is kept; no annealing.
    #
    # ``finish_learnt_rounding`` writes the chosen codes back as the weight itself, exactly on the grid.

    def start_learnt_rounding(self, weight: torch.Tensor, mode: str = "adaround", limit: float = 0.5) -> nn.Parameter:
        """Start learning the rounding of ``weight`` (this quantizer's layer weight); returns the
        variables. ``limit`` bounds an "offset" (in steps): 1/2 chooses between the two codes around
        a float weight; 1 lets a weight already on its grid move one code up or down (the end-to-end
        stage's offsets, started where the block stages left the codes)."""
        if mode == "adaround":
            scale = self._broadcast(self.scale, weight)
            rest = (weight.detach() / scale - torch.floor(weight.detach() / scale)).clamp(0.0, 1.0)
            v = -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1)
        elif mode == "offset":
            v = torch.zeros_like(weight.detach())
        else:
            raise ValueError(f"unknown rounding mode {mode!r}")
        self.rounding_mode, self.rounding_limit = mode, float(limit)
        self.rounding = nn.Parameter(v)
        return self.rounding

    @property
    def learning_rounding(self) -> bool:
        return self._parameters.get("rounding") is not None

    def soft_rounding(self) -> torch.Tensor:
        """AdaRound's h(v) in [0, 1], how far above its floor each weight is rounded."""
        h = torch.sigmoid(self.rounding) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA
        return h.clamp(0.0, 1.0)

    def rounding_regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's sum over weights of 1 - |2 h(v) - 1|^beta: 0 once every h(v) is 0 or 1."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    def _quantize_learnt_rounding(self, weight: torch.Tensor, hard: bool = False) -> torch.Tensor:
        zero_point = self._broadcast(self.zero_point, weight).to(weight.dtype)
        if self.rounding_mode == "offset":  # the step may be learnt beside the offsets (end to end)
            scale = self._broadcast(self.current_scale(), weight).to(weight.dtype)
            shifted = weight.detach() + self.rounding.clamp(-self.rounding_limit, self.rounding_limit) * scale
            return fake_quant_uniform(shifted, scale, zero_point, self.levels)
        scale = self._broadcast(self.scale, weight).to(weight.dtype)
        up = (self.rounding >= 0).to(weight.dtype) if hard else self.soft_rounding()
        code = (torch.floor(weight.detach() / scale) + up + zero_point).clamp(0, self.levels - 1)
        return (code - zero_point) * scale

    @torch.no_grad()
    def finish_learnt_rounding(self, weight: nn.Parameter) -> None:
        """Write the hard-rounded weight (on the grid) into ``weight`` and drop the rounding variables."""
        weight.copy_(self._quantize_learnt_rounding(weight, hard=True))
        del self._parameters["rounding"]

    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return t.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.learning_rounding:
            return self._quantize_learnt_rounding(x)
        scale = self._broadcast(self.current_scale(), x).to(x.dtype).clamp_min(1e-8)
        zero_point = self._broadcast(self.zero_point, x).to(x.dtype)
        return fake_quant_uniform(x, scale, zero_point, self.levels)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes in 0..2^b-1 (int32), for deployment and tests."""
        scale = self._broadcast(self.scale, x)
        zero_point = self._broadcast(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zero_point, 0, self.levels - 1).to(torch.int32)

    def calibrate(self, x: torch.Tensor) -> None:
        if not self.per_channel and self.outlier_ratio > 0:
            scale, zero_point = search_split_range(x.float(), self.bits, self.percentiles, self.channel_dim,
                                                   self.outlier_ratio)
        else:
            scale, zero_point = search_uniform_range(
                x.float(), self.bits, self.percentiles, self.channel_dim if self.per_channel else None
            )
        self.set_params(scale, zero_point)

    def extra_repr(self) -> str:
        granularity = "per-channel" if (self.is_per_channel or (self.per_channel and not self.is_calibrated)) else "per-tensor"
        return f"{super().extra_repr()}, {granularity}"


def _rows(x: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    """View ``x`` as (channels, values): one row per channel, or a single row."""
    if channel_dim is None:
        return x.reshape(1, -1)
    return x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)


def _tail(p: float, n: int) -> int:
    """How many of n sorted values lie beyond the p-quantile (on one side): the quantile is the
    ``_tail(p, n)``-th value from the top (0 = the maximum)."""
    return n - 1 - min(n - 1, max(0, round(p * (n - 1))))


def _uniform_params(low: torch.Tensor, high: torch.Tensor, levels: int):
    scale = ((high - low) / (levels - 1)).clamp_min(1e-8)
    zero_point = torch.round(-low / scale)
    return scale, zero_point


def search_uniform_range(
    x: torch.Tensor, bits: int, percentiles: Sequence[float], channel_dim: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile-MSE initialisation of an asymmetric uniform grid.

    For each candidate percentile p, clip to [quantile(1 - p), quantile(p)] (per channel or over the
    whole tensor) and keep, per channel, the candidate whose fake-quantized tensor has the lowest
    mean squared error to ``x``. Returns (scale, zero_point), one entry per channel or one in all.
    """
    levels = 2 ** bits
    rows = _rows(x, channel_dim)
    n = rows.shape[1]
    # Only the tails are needed: the k largest and k smallest values of each row (sorted), which is
    # much cheaper than sorting millions of activations.
    k = _tail(min(percentiles), n) + 1
    top = torch.topk(rows, k, dim=1, largest=True, sorted=True).values  # descending
    bottom = torch.topk(rows, k, dim=1, largest=False, sorted=True).values  # ascending
    best_err = torch.full((rows.shape[0],), float("inf"), device=x.device)
    best_scale = torch.zeros(rows.shape[0], device=x.device)
    best_zero = torch.zeros(rows.shape[0], device=x.device)
    for p in percentiles:
        low, high = bottom[:, _tail(p, n)], top[:, _tail(p, n)]
        scale, zero_point = _uniform_params(low, high, levels)
        err = (fake_quant_uniform(rows, scale[:, None], zero_point[:, None], levels) - rows).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero_point, best_zero)
    return best_scale, best_zero


def outlier_channels(x: torch.Tensor, channel_dim: int, ratio: float) -> torch.Tensor:
    """Boolean mask of the channels (along ``channel_dim``) whose largest |x| exceeds ``ratio`` times
    the median channel's largest |x|."""
    peak = _rows(x, channel_dim).abs().amax(dim=1)
    return peak > ratio * peak.median()


def search_split_range(
    x: torch.Tensor, bits: int, percentiles: Sequence[float], channel_dim: int, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-tensor grid with its outlier channels set apart: the channels of ``outlier_channels``
    share one percentile-MSE grid, all the others another. Returns (scale, zero_point) per channel
    (two distinct pairs), or one pair in all when no channel stands out.

    ViT-Ti's fc2 input in block 7 is the case in point: one channel reaches ~200 on four tokens
    while the others stay below ~3, and a single 3- or 4-bit grid either clips that channel or
    rounds every other value to zero. Deployed, the layer's product is split in two along its
    input channels (a few columns with their own activation scale), each an ordinary per-tensor
    integer product.
    """
    rows = _rows(x, channel_dim)  # (channels, values): one copy of x, read by both steps
    outliers = outlier_channels(rows, 0, ratio)
    if not outliers.any():
        return search_uniform_range(x, bits, percentiles, None)
    scale = torch.empty(rows.shape[0], device=x.device)
    zero_point = torch.empty(rows.shape[0], device=x.device)
    for group in (outliers, ~outliers):
        s, z = search_uniform_range(rows[group], bits, percentiles, None)
        scale[group], zero_point[group] = s, z
    return scale, zero_point


class LogSqrt2Quantizer(Quantizer):
    """RepQ-ViT's log-sqrt2 quantizer for post-Softmax attention (x >= 0)."""

    def __init__(self, bits: int, percentiles: Sequence[float] = ACTIVATION_PERCENTILES):
        super().__init__(bits)
        self.percentiles = tuple(percentiles)
        self.register_buffer("delta", torch.empty(0))

    @property
    def is_calibrated(self) -> bool:
        return self.delta.numel() > 0

    def _quantize_with(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return fake_quant_log2sqrt2(x, delta.to(x.dtype), self.levels)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize_with(x, self.delta)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes 0..2^b-1, and 2^b for values that dequantize to 0."""
        code = torch.round(-2 * torch.log2(x.clamp_min(1e-20) / self.delta))
        return torch.where(code > self.levels - 1, self.levels, code.clamp_min(0)).to(torch.int32)

    def calibrate(self, x: torch.Tensor) -> None:
        flat = x.float().reshape(-1)
        n = flat.numel()
        top = torch.topk(flat, _tail(min(self.percentiles), n) + 1, largest=True, sorted=True).values
        best = (float("inf"), None)
        for p in self.percentiles:
            delta = top[_tail(p, n)].clamp_min(1e-8)
            err = (self._quantize_with(flat, delta) - flat).pow(2).mean().item()
            if err < best[0]:
                best = (err, delta)
        self.delta = best[1].reshape(1).to(self.delta.device)


class SULQuantizer(Quantizer):
    """Shift-uniform-log2 quantizer (I&S-ViT) for post-Softmax attention in [0, 1].

    ``y = log2(x + eta)``; ``q = clamp(round((y - ymin) / s), 0, 2^b - 1)`` with
    ``s = (ymax - ymin) / (2^b - 1)``; ``x^ = 2^(q s + ymin) - eta``. The 2^b values
    ``2^(q s + ymin) - eta`` are all distinct (a look-up table at inference).
    ``eta`` is chosen by MSE over ``SULQ_ETAS``; ``ymin``/``ymax`` are log2 of the data's range
    shifted by eta.
    """

    def __init__(self, bits: int, etas: Sequence[float] = SULQ_ETAS):
        super().__init__(bits)
        self.etas = tuple(etas)
        self.register_buffer("eta", torch.empty(0))
        self.register_buffer("ymin", torch.empty(0))
        self.register_buffer("ymax", torch.empty(0))

    @property
    def is_calibrated(self) -> bool:
        return self.eta.numel() > 0

    def _quantize_with(self, x, eta, ymin, ymax) -> torch.Tensor:
        # in float32 whatever x's dtype: the first level 2^ymin - eta is 0 only with ymin exactly
        # log2(eta); in bfloat16 (-3.3219 -> -3.3125 for eta 0.1) it is 6.5e-4, and each of a row's
        # many near-zero probabilities gaining that adds about an eighth to a 197-token row's mass
        eta, ymin, ymax = (t.float() for t in (eta, ymin, ymax))
        step = (ymax - ymin) / (self.levels - 1)
        return fake_quant_sulq(x.float(), eta, ymin, step, self.levels).to(x.dtype)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize_with(x, *self.current_grid())

    # -- learnt grid (the end-to-end stage) -------------------------------------------------------
    # While learnt, the grid is ``eta * exp(g[0])`` and ``ymax + g[1]`` with a trainable ``grid_step``
    # g that starts at 0 (eta stays positive); ``ymin`` follows eta so that the first level
    # ``2^ymin - eta`` keeps its value: it is the calibration's smallest input, about 0, where most of
    # an attention map lies, and moving it by 1e-3 adds 1e-3 to each of those (a row of 197 tokens
    # would gain a fifth of its mass). ``freeze_grid`` folds it back into the buffers.

    def learnable_grid(self) -> nn.Parameter:
        """Make eta and the top of the log2 range trainable (see above); returns that parameter."""
        if getattr(self, "grid_step", None) is None:
            self._first_level = (torch.exp2(self.ymin) - self.eta).clamp_min(0).detach()
            self.grid_step = nn.Parameter(torch.zeros(2, device=self.eta.device))
        return self.grid_step

    def current_grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self._parameters.get("grid_step")
        if g is None:
            return self.eta, self.ymin, self.ymax
        eta = self.eta * g[0].exp()
        return eta, torch.log2(self._first_level + eta), self.ymax + g[1]

    @torch.no_grad()
    def freeze_grid(self) -> None:
        """Fold the learnt offsets into ``eta``, ``ymin``, ``ymax`` and drop the parameter (a range
        that the training turned around is put back to ymax > ymin)."""
        if self._parameters.get("grid_step") is None:
            return
        eta, ymin, ymax = (t.detach().clone() for t in self.current_grid())
        del self._parameters["grid_step"]
        self.eta, self.ymin, self.ymax = eta, ymin, torch.maximum(ymax, ymin + 1e-3)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        step = (self.ymax - self.ymin) / (self.levels - 1)
        code = torch.round((torch.log2(x + self.eta) - self.ymin) / step)
        return code.clamp(0, self.levels - 1).to(torch.int32)

    def table(self) -> torch.Tensor:
        """The 2^b dequantized values, code 0 first."""
        step = (self.ymax - self.ymin) / (self.levels - 1)
        return torch.exp2(torch.arange(self.levels, device=self.eta.device) * step + self.ymin) - self.eta

    def calibrate(self, x: torch.Tensor) -> None:
        flat = x.float().reshape(-1)
        lo, hi = flat.min().clamp_min(0), flat.max()
        best = (float("inf"), None)
        for eta in self.etas:
            eta_t = torch.tensor(eta, device=flat.device)
            ymin, ymax = torch.log2(lo + eta_t), torch.log2(hi + eta_t)
            if not ymax > ymin:
                continue
            err = (self._quantize_with(flat, eta_t, ymin, ymax) - flat).pow(2).mean().item()
            if err < best[0]:
                best = (err, (eta_t, ymin, ymax))
        if best[1] is None:  # constant input: any grid through the value reproduces it
            eta_t = torch.tensor(self.etas[0], device=flat.device)
            best = (0.0, (eta_t, torch.log2(lo + eta_t), torch.log2(lo + eta_t) + 1))
        eta, ymin, ymax = best[1]
        device = self.eta.device
        self.eta, self.ymin, self.ymax = (t.reshape(1).to(device) for t in (eta, ymin, ymax))


SOFTMAX_QUANTIZERS = ("sulq", "log2sqrt2", "uniform")


def make_softmax_quantizer(kind: str, bits: int) -> Quantizer:
    """The post-Softmax quantizer named by ``kind``: one of ``SOFTMAX_QUANTIZERS``."""
    if kind == "sulq":
        return SULQuantizer(bits)
    if kind == "log2sqrt2":
        return LogSqrt2Quantizer(bits)
    if kind == "uniform":
        return UniformQuantizer(bits)
    raise ValueError(f"unknown post-Softmax quantizer {kind!r}; choose one of {', '.join(SOFTMAX_QUANTIZERS)}")
