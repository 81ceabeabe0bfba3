"""What each method reads: one small frozen config per method, and I&S-ViT's presets.

    quantize(model, calib, MinmaxConfig(w_bits=8, a_bits=8))
    quantize(model, calib, RepqConfig(w_bits=4, a_bits=4))
    quantize(model, calib, IsvitConfig(w_bits=3, a_bits=3, preset="fast"))
    quantize(model, calib, IsvitConfig(w_bits=3, a_bits=3, preset="fast",
                                       reconstruction=PRESETS["fast"].at(3, 3, iters=50)))

A config holds only what its method reads, each field with the method's default. I&S-ViT's block
reconstruction is one ``Reconstruction``; a ``Preset`` names one per bit range (with the activation
grids and the rotation it goes with), and ``Preset.at`` gives it with changes. In ``IsvitConfig``,
``None`` for ``reconstruction``, ``act_percentile`` or ``rotate`` means the preset's at the config's
bit widths (``resolved()`` fills them in); ``rotate=None`` rotates where the model allows it (a model
that cannot be rotated is quantized without, with a warning), where ``True`` insists.

A config is written to JSON, checkpoints and ONNX files as ``to_dict()`` (resolved, with the rotation
the model really got: ``pipeline.applied_config``) and read back by ``config_from_dict``, which also
reads the flat dict of isvit's earlier ``QuantConfig``. Adding a setting: a field here (with its
check in ``__post_init__``), and a row in cli.py's ``CONFIG_OPTIONS`` if the command line sets it.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .errors import IsvitError
from .quantizers import ACTIVATION_PERCENTILES, LOW_ACTIVATION_PERCENTILES, SOFTMAX_QUANTIZERS, check_bits
from .wrap import Placement

METHODS = ("isvit", "repq", "minmax")
LOSSES = ("mse", "token", "fisher")
ROUNDINGS = ("ste", "adaround", "offset")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")


def _check(ok: bool, sentence: str) -> None:
    if not ok:
        raise IsvitError(sentence)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class Reconstruction:
    """How I&S-ViT trains each unit (reconstruct.py). The defaults are the paper's settings at 6 bits
    (Adam 4e-5 with cosine decay, batch 64, 200 iterations per unit, plain MSE)."""

    iters: int = 200  # per unit and stage
    batch_size: int = 64
    lr: float = 4e-5
    loss: str = "mse"  # "token": each token's squared error relative to its target's variance; "fisher"
    qdrop: float = 0.0  # QDrop: while training, each activation keeps its float value with this probability
    rounding: str = "ste"  # stage 3 trains "ste" (the latent weights, the paper's), "adaround" or "offset"
    round_lr: float | None = None  # learnt rounding's learning rate (None with "ste", which learns none)
    round_reg: float = 0.1  # AdaRound's regulariser: at 1, a weight half-way up weighs the unit's first loss
    learn_scales: bool = False  # also learn the quantizers' step sizes (LSQ, on log(scale))
    scale_lr: float = 5e-3  # Adam on log(scale): a relative change of about this much a step
    cache_dtype: str = "float32"  # precision of the cached unit inputs/outputs
    cache_device: str | None = None  # where they live (None: where the model runs)
    # "bfloat16": each unit's forward and backward under torch.autocast (matrix products in bf16,
    # fast on CPUs with AVX-512 BF16 or AMX and on GPUs); the loss, the gradients' sum and the
    # optimiser stay float32. "auto": bfloat16 where the device has fast bf16, float32 elsewhere
    compute_dtype: str = "float32"
    check_size: int = 256  # calibration images on which a unit's loss is compared before/after
    micro_batch: int = 32  # a batch is run in chunks of this many images, gradients accumulated
    round_warmup: float = 0.2  # fraction of the iterations before AdaRound's regulariser starts
    round_beta: tuple[float, float] = (20.0, 2.0)  # its exponent, annealed from the first to the second

    def __post_init__(self):
        _check(isinstance(self.iters, int) and not isinstance(self.iters, bool) and self.iters >= 0,
               f"iters must be a whole number of at least 0, got {self.iters!r}")
        for name in ("batch_size", "check_size", "micro_batch"):
            _check(_positive_int(getattr(self, name)), f"{name} must be a positive integer, got {getattr(self, name)!r}")
        _check(self.loss in LOSSES, f"unknown reconstruction loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        _check(self.rounding in ROUNDINGS, f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        _check(0.0 <= self.qdrop < 1.0, f"qdrop must be in [0, 1), got {self.qdrop!r}")
        for name in ("lr", "scale_lr"):
            _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        _check(self.round_lr is None or self.round_lr > 0, f"round_lr must be positive, got {self.round_lr!r}")
        _check(self.rounding == "ste" or self.round_lr is not None,
               f"rounding {self.rounding!r} learns its rounding: give its learning rate round_lr "
               f"(or take it from a preset: PRESETS[name].at(w_bits, a_bits, rounding={self.rounding!r}))")
        _check(self.round_reg >= 0, f"round_reg must be zero or positive, got {self.round_reg!r}")
        _check(self.compute_dtype in COMPUTE_DTYPES,
               f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        _check(self.cache_dtype in CACHE_DTYPES, f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.cache_device is not None:
            try:
                torch.device(self.cache_device)
            except (RuntimeError, TypeError):
                raise IsvitError(f"cache_device must name a torch device such as 'cpu' or 'cuda', "
                                 f"got {self.cache_device!r}") from None


E2E_LOSSES = ("auto", "kl", "mse")


@dataclass(frozen=True)
class EndToEnd:
    """The end-to-end stage after block reconstruction (endtoend.py): the whole quantized model
    trained at once towards the full-precision model's outputs on the calibration images: the KL
    divergence of their output distributions ("kl", for classifiers) or each output token's squared
    error relative to its variance ("mse", for feature extractors); "auto": "kl" where the model
    has a classifier (timm's ``num_classes`` above 0), "mse" where it has none. It trains every uniform
    quantizer's step size (in the log domain, ``scale_lr``) and the float parameters that are not
    quantized weights (biases, LayerNorm affines, position embeddings: ``lr``); the integer codes
    of the weights move through their step sizes and, with ``round_lr`` above 0, through a learnt
    rounding offset of each weight (at most one code up or down an epoch); ``softmax_lr`` above 0
    also trains the post-Softmax SULQ grids (eta and the top of the log2 range)."""

    epochs: int = 0  # passes over the calibration images; 0: no end-to-end stage
    batch_size: int = 32
    lr: float = 1e-4
    scale_lr: float = 1e-3
    loss: str = "auto"
    # each batch flipped left-right with probability 1/2 and cut to a random square of 60-100% of
    # its side, resized back (one draw per batch); the full-precision targets are computed on it
    augment: bool = False
    micro_batch: int = 32  # a batch is run in chunks of this many images, gradients accumulated
    compute_dtype: str = "float32"  # the quantized model's forward and backward, as Reconstruction's
    # calibration images (the last ones) that no stage trains on, the block stages included; the
    # stage's loss on them is measured after each epoch: it stops at the first epoch that raised it,
    # and undoes that epoch
    holdout: int = 0
    round_lr: float = 0.0  # the weights' rounding offsets (in steps; 0: not trained)
    softmax_lr: float = 0.0  # SULQ's log(eta) and the top of its log2 range (0: not trained)

    def __post_init__(self):
        _check(self.compute_dtype in COMPUTE_DTYPES,
               f"end-to-end compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        _check(isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and self.epochs >= 0,
               f"end-to-end epochs must be a whole number of at least 0, got {self.epochs!r}")
        for name in ("batch_size", "micro_batch"):
            _check(_positive_int(getattr(self, name)),
                   f"end-to-end {name} must be a positive integer, got {getattr(self, name)!r}")
        _check(isinstance(self.holdout, int) and not isinstance(self.holdout, bool) and self.holdout >= 0,
               f"end-to-end holdout must be a whole number of images (0: none), got {self.holdout!r}")
        for name in ("lr", "scale_lr", "round_lr", "softmax_lr"):
            _check(getattr(self, name) >= 0, f"end-to-end {name} must be zero or positive, got {getattr(self, name)!r}")
        _check(self.loss in E2E_LOSSES, f"unknown end-to-end loss {self.loss!r}; choose one of {', '.join(E2E_LOSSES)}")
        _check(isinstance(self.augment, bool), f"end-to-end augment must be True or False, got {self.augment!r}")


@dataclass(frozen=True)
class Preset:
    """I&S-ViT's settings for one budget: a ``Reconstruction`` above 4 bits and one at <= 4 bits
    (either of weights or activations), the lowest activation clipping percentile and the rotation
    at <= 4 bits, the learnt roundings' learning rates (``round_lrs``, taken when a change picks
    another rounding) and the end-to-end stage; at <= 3 bits a reconstruction and an end-to-end
    stage of their own where set (``three_bits``, ``three_bits_end_to_end``)."""

    above_4_bits: Reconstruction
    low_bits: Reconstruction
    low_bits_act_percentile: float = 0.999
    low_bits_rotate: bool = False
    round_lrs: dict = field(default_factory=lambda: {"adaround": 1e-2, "offset": 1e-2})
    end_to_end: EndToEnd = EndToEnd()
    three_bits: Reconstruction | None = None  # None: low_bits
    three_bits_end_to_end: EndToEnd | None = None  # None: end_to_end

    def at(self, w_bits: int, a_bits: int, **changes) -> Reconstruction:
        """The reconstruction at these bit widths, with ``changes`` (fields of ``Reconstruction``);
        a changed ``rounding`` without a ``round_lr`` takes this preset's for it."""
        lowest = min(w_bits, a_bits)
        base = self.above_4_bits if lowest > 4 else self.three_bits if lowest <= 3 and self.three_bits else self.low_bits
        for name in changes:
            _check(name in Reconstruction.__dataclass_fields__, f"Reconstruction has no setting {name!r}")
        if "rounding" in changes and changes.get("round_lr") is None:
            changes["round_lr"] = self.round_lrs.get(changes["rounding"])
        return dataclasses.replace(base, **changes)

    def end_to_end_at(self, w_bits: int, a_bits: int) -> EndToEnd:
        """The end-to-end stage at these bit widths."""
        if min(w_bits, a_bits) <= 3 and self.three_bits_end_to_end is not None:
            return self.three_bits_end_to_end
        return self.end_to_end

    def act_percentile(self, w_bits: int, a_bits: int) -> float:
        return self.low_bits_act_percentile if min(w_bits, a_bits) <= 4 else 0.999

    def rotate(self, w_bits: int, a_bits: int) -> bool:
        return self.low_bits_rotate if min(w_bits, a_bits) <= 4 else False


# "paper": I&S-ViT's settings (1000 iterations per unit at 3/4 bits, 200 at 6 bits).
PAPER = Preset(above_4_bits=Reconstruction(), low_bits=Reconstruction(iters=1000))
# "fast": for a CPU budget of minutes. Every choice was made on held-out calibration images, never
# on the evaluation set (benchmarks/tune_heldout.py; what each did: docs/results.md#how-the-fast-preset-was-chosen):
# a larger learning rate and the token-normalised loss make up for 16x fewer iterations than the
# paper's, and QDrop. At <= 4 bits it adds what lowered the held-out KL divergence there: activation
# grids searched down to the 0.99 percentile, the rotation, the Fisher-weighted loss, learnt rounding
# offsets and more iterations per unit. The learnt roundings' learning rates and AdaRound's regulariser
# are larger than AdaRound's usual ones because at so few iterations the usual ones leave most
# rounding variables undecided (docs/methods.md, --rounding). At <= 4 bits the reconstruction runs
# in bf16 where the device is fast at it (held-out W3/A3: the same KL as float32 in 0.78x the time),
# and the time saved pays for 140 iterations instead of 100 (held-out KL 2.17 at 100, 2.01 at 180).
# At <= 3 bits 100 iterations and 2 end-to-end epochs (larger learning rates than the stage's own)
# take about the time of 140 without and ended lower on held-out images of three splits (KL 2.05,
# 2.02, 2.04 against 2.13, 2.16, 2.19); at 4 and 6 bits the stage raised the held-out KL: off there.
_FAST = Reconstruction(iters=30, batch_size=32, lr=5e-4, loss="token", qdrop=0.5, round_reg=1000.0)
_FAST_LOW = dataclasses.replace(_FAST, iters=140, loss="fisher", rounding="offset", round_lr=3e-2, compute_dtype="auto")
FAST = Preset(above_4_bits=_FAST, low_bits=_FAST_LOW,
              low_bits_act_percentile=0.99, low_bits_rotate=True, round_lrs={"adaround": 0.3, "offset": 3e-2},
              end_to_end=EndToEnd(compute_dtype="auto"),
              three_bits=dataclasses.replace(_FAST_LOW, iters=100),
              three_bits_end_to_end=EndToEnd(epochs=2, lr=3e-4, scale_lr=3e-3, compute_dtype="auto"))
# "thorough": the fast recipe with the later methods' GPU budget (3000 iterations per unit at <= 4
# bits, 1000 above), training the latent weights, which did better than the offsets on one block at
# long schedules, with AdaRound's usual settings (docs/methods.md, presets and --rounding).
_THOROUGH = dataclasses.replace(_FAST, iters=1000, round_reg=0.1)
THOROUGH = Preset(above_4_bits=_THOROUGH,
                  low_bits=dataclasses.replace(_THOROUGH, iters=3000, loss="fisher", compute_dtype="auto"),
                  low_bits_act_percentile=0.99, low_bits_rotate=True, end_to_end=EndToEnd(compute_dtype="auto"))
PRESETS = {"paper": PAPER, "fast": FAST, "thorough": THOROUGH}


def activation_percentiles(lowest: float) -> tuple[float, ...]:
    """The clipping percentiles searched for activation grids, from ``lowest`` up."""
    extra = (p for p in LOW_ACTIVATION_PERCENTILES if p >= lowest)
    return tuple(sorted({lowest, *extra, *ACTIVATION_PERCENTILES}))


def _check_common(config) -> None:
    """The checks of the fields every method has."""
    for name in ("w_bits", "a_bits"):
        try:
            check_bits(getattr(config, name))
        except ValueError:
            raise IsvitError(f"{name} must be an integer from 2 to 8, got {getattr(config, name)!r}") from None
    _check(_positive_int(config.calib_size), f"calib_size must be a positive integer, got {config.calib_size!r}")
    _check(isinstance(config.seed, int) and not isinstance(config.seed, bool), f"seed must be an integer, got {config.seed!r}")
    _check(config.softmax_quantizer in SOFTMAX_QUANTIZERS,
           f"unknown post-Softmax quantizer {config.softmax_quantizer!r}; choose one of {', '.join(SOFTMAX_QUANTIZERS)}")
    _check(config.outlier_ratio == 0 or config.outlier_ratio > 1,
           f"outlier_ratio must be 0 (off) or greater than 1, got {config.outlier_ratio!r}")
    _check(config.act_percentile is None or 0.9 <= config.act_percentile <= 1.0,
           f"act_percentile must be in [0.9, 1], got {config.act_percentile!r}")
    _check(config.rotate is None or isinstance(config.rotate, bool), f"rotate must be True or False, got {config.rotate!r}")
    _check(isinstance(config.bias_correction, bool), f"bias_correction must be True or False, got {config.bias_correction!r}")


@dataclass(frozen=True)
class _TrainingFree:
    """The fields of the training-free methods (calibrate, then correct the biases)."""

    method: ClassVar[str]
    w_bits: int = 4
    a_bits: int = 4
    calib_size: int = 32
    seed: int = 0  # which calibration images, and the rotation's random signs
    softmax_quantizer: str = "uniform"
    act_percentile: float = 0.999  # the lowest clipping percentile searched for activation grids
    rotate: bool = False  # rotate the full-precision model first (rotate.py)
    # Per-tensor Linear inputs set apart the channels whose peak exceeds this many times the median
    # channel's (a second grid for them; 0: off, the published methods)
    outlier_ratio: float = 0.0
    bias_correction: bool = True

    def __post_init__(self):
        _check_common(self)
        _check(self.act_percentile is not None, "act_percentile must be a number in [0.9, 1]")
        _check(self.rotate is not None, "rotate must be True or False")

    def resolved(self):
        return self

    def wants_rotation(self) -> bool:
        return self.rotate

    def placement(self) -> Placement:
        return Placement(w_bits=self.w_bits, a_bits=self.a_bits, softmax_quantizer=self.softmax_quantizer,
                         post_ln_per_channel=self.method == "repq", outlier_ratio=self.outlier_ratio,
                         activation_percentiles=activation_percentiles(self.act_percentile))

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class MinmaxConfig(_TrainingFree):
    """Min-max (percentile-MSE) calibration: per-tensor activations, a uniform post-Softmax grid,
    then bias correction (``bias_correction=False``: the published method)."""

    method: ClassVar[str] = "minmax"


@dataclass(frozen=True)
class RepqConfig(_TrainingFree):
    """RepQ-ViT: per-channel post-LayerNorm activations folded into LayerNorm + Linear, a log-sqrt2
    post-Softmax grid, then bias correction (``bias_correction=False``: the published method)."""

    method: ClassVar[str] = "repq"
    softmax_quantizer: str = "log2sqrt2"


@dataclass(frozen=True)
class IsvitConfig:
    """I&S-ViT: SULQ post-Softmax grids and the three-stage smooth optimisation (pipeline.py).
    ``None`` for ``reconstruction``, ``act_percentile`` and ``rotate``: the preset's at these bits."""

    method: ClassVar[str] = "isvit"
    w_bits: int = 4
    a_bits: int = 4
    preset: str = "paper"
    reconstruction: Reconstruction | None = None
    end_to_end: EndToEnd | None = None  # None: the preset's at these bits
    calib_size: int = 1024
    seed: int = 0  # which calibration images, the rotation's signs, the reconstruction's batches and QDrop's masks
    softmax_quantizer: str = "sulq"
    act_percentile: float | None = None
    rotate: bool | None = None  # None: the preset's, skipped with a warning where the model cannot be rotated
    # Outlier channels of per-tensor Linear inputs on a grid of their own (quantizers.search_split_range),
    # chosen on held-out calibration images (docs/methods.md, outlier channels)
    outlier_ratio: float = 8.0
    bias_correction: bool = False  # the reconstruction absorbs the error that bias correction removes
    stage1: bool = True  # stage 1: reconstruction with full-precision weights
    fold: bool = True  # stage 2: per-channel post-LayerNorm grids folded into LayerNorm + Linear
    gptq: bool = False  # stage 3 starts from GPTQ-rounded weights (default: round to nearest, the paper's)
    init_size: int = 64  # calibration images that initialise the activation grids

    def __post_init__(self):
        _check(self.preset in PRESETS, f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        _check_common(self)
        _check(self.reconstruction is None or isinstance(self.reconstruction, Reconstruction),
               f"reconstruction must be a Reconstruction, got {type(self.reconstruction).__name__}")
        _check(self.end_to_end is None or isinstance(self.end_to_end, EndToEnd),
               f"end_to_end must be an EndToEnd, got {type(self.end_to_end).__name__}")
        _check(_positive_int(self.init_size), f"init_size must be a positive integer, got {self.init_size!r}")

    @classmethod
    def from_preset(cls, preset: str = "paper", *, w_bits: int = 4, a_bits: int = 4, **changes) -> IsvitConfig:
        """The preset's config at these bit widths with ``changes``: fields of ``IsvitConfig`` or of
        ``Reconstruction`` (applied to the preset's reconstruction, ``Preset.at``), e.g.
        ``IsvitConfig.from_preset("fast", w_bits=3, a_bits=3, iters=50, calib_size=256)``."""
        _check(preset in PRESETS, f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        recon = {k: changes.pop(k) for k in list(changes) if k in Reconstruction.__dataclass_fields__}
        own = {f.name for f in dataclasses.fields(cls)} - {"reconstruction"}
        for name in changes:
            _check(name in own, f"IsvitConfig has no setting {name!r}")
        reconstruction = PRESETS[preset].at(w_bits, a_bits, **recon) if recon else None
        return cls(w_bits=w_bits, a_bits=a_bits, preset=preset, reconstruction=reconstruction, **changes)

    def resolved(self) -> IsvitConfig:
        """This config with the preset's reconstruction, activation percentile and rotation filled in
        (what ``to_dict`` records; a resolved ``rotate=True`` insists on the rotation)."""
        preset = PRESETS[self.preset]
        return dataclasses.replace(
            self,
            reconstruction=self.reconstruction or preset.at(self.w_bits, self.a_bits),
            end_to_end=self.end_to_end or preset.end_to_end_at(self.w_bits, self.a_bits),
            act_percentile=self.act_percentile if self.act_percentile is not None
            else preset.act_percentile(self.w_bits, self.a_bits),
            rotate=self.wants_rotation(),
        )

    def wants_rotation(self) -> bool:
        return self.rotate if self.rotate is not None else PRESETS[self.preset].rotate(self.w_bits, self.a_bits)

    def placement(self) -> Placement:
        return Placement(w_bits=self.w_bits, a_bits=self.a_bits, softmax_quantizer=self.softmax_quantizer,
                         post_ln_per_channel=self.fold, outlier_ratio=self.outlier_ratio,
                         activation_percentiles=activation_percentiles(self.resolved().act_percentile))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.resolved())
        d["reconstruction"]["round_beta"] = list(d["reconstruction"]["round_beta"])
        return {"method": self.method, **d}


Config = IsvitConfig | RepqConfig | MinmaxConfig
CONFIGS: dict[str, type] = {"isvit": IsvitConfig, "repq": RepqConfig, "minmax": MinmaxConfig}


def config_from_dict(d: dict, strict: bool = True) -> Config:
    """The config that ``to_dict`` wrote (checkpoints, ONNX metadata); with ``strict=False`` also
    from a dict that holds other entries beside it (``isvit quantize --json``'s result). Also reads
    the flat dict of isvit's earlier ``QuantConfig`` (``legacy_fields``)."""
    d = dict(d)
    method = d.pop("method", None)
    _check(method in CONFIGS, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if "reconstruction" not in d and any(k in d for k in LEGACY_ONLY):
        return CONFIGS[method](**legacy_fields(method, d, written=True))
    if not strict:
        fields = {f.name for f in dataclasses.fields(CONFIGS[method])}
        d = {k: v for k, v in d.items() if k in fields}
    if method == "isvit":  # a file from before the end-to-end stage existed had none
        d["end_to_end"] = EndToEnd(**d.get("end_to_end", {}))
    recon = d.pop("reconstruction", None)
    if recon is not None:
        if not isinstance(recon, dict):
            raise TypeError("reconstruction must be a dict")
        if "round_beta" in recon:
            recon = {**recon, "round_beta": tuple(recon["round_beta"])}
        d["reconstruction"] = Reconstruction(**recon)
    return CONFIGS[method](**d)


# ---------------------------------------------------------------------------------------------
# isvit's earlier single QuantConfig: its files still load, its keyword arguments still work (deprecated)
# ---------------------------------------------------------------------------------------------

# QuantConfig's names that are now called otherwise
RENAMED = {"reparameterize": "fold", "drop_prob": "qdrop"}
# QuantConfig's reconstruction fields (flat there), and the fields only it had
RECONSTRUCTION_FIELDS = ("iters", "batch_size", "lr", "learn_scales", "loss", "drop_prob", "rounding", "round_lr",
                         "round_reg", "scale_lr", "cache_dtype", "cache_device")
LEGACY_ONLY = ("preset", "reparameterize", "drop_prob", "iters")
# QuantConfig's I&S-ViT fields that were not None by default
ISVIT_ONLY_DEFAULTS = {"preset": "paper", "stage1": True, "reparameterize": True, "gptq": False, "init_size": 64,
                       "cache_dtype": "float32"}


def legacy_fields(method: str, d: dict, written: bool) -> dict:
    """The fields of ``method``'s config from the flat fields of the earlier ``QuantConfig``.
    ``written``: ``d`` is what a file recorded (``QuantConfig.to_dict()``: every default resolved,
    ``act_percentile`` None for 0.999, missing fields from before they existed); otherwise ``d`` is
    ``QuantConfig``'s keyword arguments, where None means the method's or preset's default."""
    original, d = d, dict(d)
    recon = {RENAMED.get(k, k): d.pop(k) for k in RECONSTRUCTION_FIELDS if k in d}
    recon = {k: v for k, v in recon.items() if v is not None}
    common = ("w_bits", "a_bits", "calib_size", "seed", "softmax_quantizer", "act_percentile", "rotate",
              "outlier_ratio", "bias_correction")
    out = {k: d[k] for k in common if d.get(k) is not None}
    if written:
        out.setdefault("act_percentile", 0.999)  # None, or absent: the grids were searched from 0.999
        out.setdefault("rotate", False)  # files from before the rotation existed
    if method == "isvit":
        if written:
            out["end_to_end"] = EndToEnd()  # QuantConfig had no end-to-end stage
        for old in ("preset", "stage1", "reparameterize", "gptq", "init_size"):
            if d.get(old) is not None:
                out[RENAMED.get(old, old)] = d[old]
        if recon:
            preset = PRESETS.get(out.get("preset", "paper"), PAPER)
            w_bits, a_bits = out.get("w_bits", 4), out.get("a_bits", 4)
            if written and recon.get("rounding", "ste") == "ste":
                recon["round_lr"] = None  # recorded as None: "ste" learns no rounding
            if written:
                recon["compute_dtype"] = "float32"  # QuantConfig's reconstruction ran in float32
            out["reconstruction"] = preset.at(w_bits, a_bits, **recon)
    else:  # QuantConfig ignored the I&S-ViT fields for repq/minmax; they must have their defaults
        given = [k for k in (*ISVIT_ONLY_DEFAULTS, *RECONSTRUCTION_FIELDS)
                 if original.get(k) is not None and original.get(k) != ISVIT_ONLY_DEFAULTS.get(k)]
        _check(not given, f"{method} does not read {', '.join(given)}: I&S-ViT's settings (method='isvit')")
    return out


def QuantConfig(method: str = "repq", **kwargs) -> Config:
    """Deprecated: isvit's earlier single config. Returns the method's own config (``IsvitConfig``,
    ``RepqConfig``, ``MinmaxConfig``) with a warning; ``reparameterize`` is now ``fold``, ``drop_prob``
    ``qdrop``, and the reconstruction's fields are one ``Reconstruction``."""
    warnings.warn("QuantConfig is deprecated: use IsvitConfig, RepqConfig or MinmaxConfig (isvit.config)",
                  DeprecationWarning, stacklevel=2)
    _check(method in CONFIGS, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    known = {"w_bits", "a_bits", "calib_size", "softmax_quantizer", "seed", "bias_correction", "preset", "stage1",
             "reparameterize", "gptq", "rotate", "outlier_ratio", "act_percentile", "init_size", *RECONSTRUCTION_FIELDS}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"QuantConfig() got an unexpected keyword argument {unknown[0]!r}")
    return CONFIGS[method](**legacy_fields(method, kwargs, written=False))
