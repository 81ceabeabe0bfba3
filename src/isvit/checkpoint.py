"""Integer checkpoints: a quantized model in one safetensors file, written atomically, and rebuilt
from that file alone.

File format ``isvit-int-v1`` (one safetensors file):

- for every quantized weight (the ``weight`` of each ``QuantLinear`` and ``QuantConv2d``) named
  ``L.weight`` in the model's ``state_dict()``, ``L.weight`` itself is absent and instead
  ``L.weight_codes`` (uint8) holds its integer codes 0..2^b-1, flattened in row-major order:
  one code a byte for 5..8 bits; two a byte for 2..4 bits, code 2i in the low nibble and code
  2i+1 in the high nibble of byte i (an odd count leaves the last high nibble 0).
  ``L.weight_quantizer.scale`` (float32) and ``L.weight_quantizer.zero_point`` (int32) hold the
  grid, one entry per output channel (or one in all); the weight is ``(codes - zero_point) * scale``;
- every other entry of the ``state_dict()`` as saved by PyTorch: the activation quantizers'
  parameters (uniform ``scale``/``zero_point``, SULQ ``eta``/``ymin``/``ymax``, log-sqrt2
  ``delta``), the folded LayerNorms, the biases (after bias correction or
  reconstruction), position embeddings, cls token and so on, as float tensors;
- metadata (JSON strings): ``format`` (``isvit-int-v1``), ``model`` (the timm architecture name),
  ``model_args`` (keyword arguments of ``timm.create_model``, usually ``{}``; a transformers
  config's ``layer_norm_eps`` among them: ``models.build_model``), ``config``
  (the method's config, ``config.to_dict()``: config.py), ``data_config`` (the preprocessing) and ``quantized_weights``
  ({layer: {"bits": b, "shape": [...]}}, the unpacked shape of each weight).

The float latent weights of quantized layers are not stored: at 4 bits the file is about 7x
smaller than the float32 weights. Loading builds the architecture with timm (never downloading),
wraps it with the config's placement and sets each quantized weight to its dequantized value, which
the weight quantizer maps back onto the same codes: the rebuilt model computes exactly what the
saved one did.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from .config import Config, config_from_dict
from .errors import IsvitError
from .files import atomic_write
from .models import build_model
from .modules import QuantConv2d, QuantLinear
from .pipeline import applied_config, quantizers
from .quantizers import check_bits
from .rotate import rotate_model
from .wrap import wrap_model

FORMAT = "isvit-int-v1"
CODES_SUFFIX = ".weight_codes"


# ---------------------------------------------------------------------------------------------
# Packing integer codes
# ---------------------------------------------------------------------------------------------

def packed_length(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take: two codes a byte at 2..4 bits, else one."""
    return (numel + 1) // 2 if check_bits(bits) <= 4 else numel


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes 0..2^bits-1 (any shape) as a flat uint8 tensor.

    At 2..4 bits two codes share a byte: code 2i (row-major order) in the low nibble and code
    2i+1 in the high nibble of byte i; an odd count leaves the last high nibble 0.
    """
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2 ** check_bits(bits)):
        raise ValueError(f"codes must lie in 0..{2 ** bits - 1} for {bits} bits")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits > 4:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of ``pack_codes``: uint8 codes of the given shape."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_length(numel, bits):
        raise ValueError(f"expected {packed_length(numel, bits)} packed uint8 codes for shape {tuple(shape)} at {bits} bits")
    if bits > 4:
        return packed.reshape(shape)
    flat = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return flat[:numel].reshape(shape)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in float32, with one scale and zero point per output channel
    (dim 0) or one in all: the same arithmetic as the weight quantizer's, so re-quantizing the
    result gives back exactly these codes and values."""
    shape = [-1] + [1] * (codes.dim() - 1) if scale.numel() > 1 else []
    scale = scale.float().reshape(shape).clamp_min(1e-8)
    zero_point = zero_point.float().reshape(shape)
    return (codes.float() - zero_point) * scale


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer whose weight is quantized: each QuantLinear and QuantConv2d."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def _check_ready(model: nn.Module) -> None:
    """Refuse a model whose file would not compute what it computes: every quantizer must be on
    (a rebuilt model has them all on) and calibrated."""
    found = quantizers(model)
    if not found:
        raise IsvitError("the model has no quantizers: quantize it before saving it")
    for name, q in found:
        if not q.enabled:
            raise IsvitError(f"quantizer {name} is switched off: switch every quantizer on before saving the model")
        if not q.is_calibrated:
            raise IsvitError(f"quantizer {name} is not calibrated: quantize the model before saving it")


@torch.no_grad()
def integer_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors of an integer checkpoint (on the CPU), and each quantized layer's bits and
    weight shape."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    layers = {}
    for name, layer in quantized_layers(model):
        quantizer = layer.weight_quantizer
        codes = quantizer.codes(layer.weight.detach())
        del tensors[f"{name}.weight"]
        tensors[name + CODES_SUFFIX] = pack_codes(codes, quantizer.bits).cpu()
        zero_point_key = f"{name}.weight_quantizer.zero_point"
        tensors[zero_point_key] = torch.round(tensors[zero_point_key]).to(torch.int32)  # integer-valued already
        layers[name] = {"bits": quantizer.bits, "shape": list(layer.weight.shape)}
    return tensors, layers


def save_quantized(
    model: nn.Module,
    path: str | Path,
    *,
    model_name: str,
    config: Config,
    data_config: dict,
    model_args: dict | None = None,
) -> None:
    """Write ``model`` (quantized by ``isvit.quantize``) as an integer checkpoint, atomically.

    ``model_name`` is the timm architecture name and ``model_args`` the keyword arguments it was
    created with (e.g. ``num_classes``), so that ``load_quantized`` can rebuild it.
    """
    from safetensors.torch import save_file

    _check_ready(model)
    config = applied_config(model, config)
    tensors, layers = integer_tensors(model)
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "model_args": json.dumps(model_args or {}),
        "config": json.dumps(config.to_dict()),
        "data_config": json.dumps(data_config),
        "quantized_weights": json.dumps(layers),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def float32_size(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict()`` stored as float32 (the size of its fp32 weights file,
    give or take the header)."""
    return sum(t.numel() for t in model.state_dict().values()) * 4


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an isvit integer checkpoint, after checking that it is one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise IsvitError(f"quantized model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            check_format(metadata, path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors file, not a dict)
    except IsvitError:
        raise
    except Exception as exc:  # safetensors' own error type: a bad header, a truncated file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IsvitError(f"cannot read quantized model file {path}, it is corrupt or truncated ({detail})") from exc
    return tensors, metadata


def check_format(
    metadata: dict[str, str],
    path: Path,
    expected: str = FORMAT,
    kind: str = "an isvit quantized model file",
    redo: str = "quantize the model again",
) -> None:
    """Accept the ``expected`` format only, with different sentences for other isvit formats and
    for files that are not isvit's at all (the ONNX export's metadata is checked the same way)."""
    found = metadata.get("format", "")
    if found == expected:
        return
    if found.startswith("isvit-"):
        raise IsvitError(f"{path} has format {found!r}, which this isvit cannot read (it reads {expected}): {redo}")
    raise IsvitError(f"{path} is not {kind} (its metadata names no isvit format)")


def metadata_config(metadata: dict[str, str], path: Path, allow_none: bool = False) -> Config | None:
    """The method's config stored as JSON under ``config`` (``null`` accepted with ``allow_none``);
    files written by earlier versions hold ``QuantConfig``'s flat dict (``config.config_from_dict``)."""
    value = metadata_json(metadata, "config", path, (dict, type(None)) if allow_none else dict)
    if value is None:
        return None
    try:
        return config_from_dict(value)
    except (TypeError, ValueError, IsvitError):
        raise IsvitError(f"{path} has no valid 'config' entry in its metadata") from None


def metadata_json(metadata: dict[str, str], key: str, path: Path, kind):
    """The JSON value stored under ``key``, which must be an instance of ``kind`` (a type or tuple)."""
    invalid = IsvitError(f"{path} has no valid {key!r} entry in its metadata")
    try:
        value = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError):
        raise invalid from None
    if not isinstance(value, kind):
        raise invalid
    return value


def _build_model(name: str, model_args: dict, config: Config, path: Path) -> nn.Module:
    """The named timm architecture, randomly initialised (no download), rotated and wrapped as
    ``config`` says. Rotation is rerun on the random weights for its structure (the norms it swaps
    in, the biases it adds): every weight it computes is then overwritten by the file's."""
    if not timm.is_model(name):
        raise IsvitError(f"{path} names the architecture {name!r}, which timm does not know")
    try:
        model = build_model(name, model_args)
    except Exception as exc:  # timm raises TypeError/ValueError/AssertionError for bad arguments
        raise IsvitError(f"cannot build the {name} architecture with the arguments in {path} ({type(exc).__name__})") from exc
    if config.rotate:  # the same modules as the saved model's (its weights come from the file)
        rotate_model(model, seed=config.seed)
    return wrap_model(model, config.placement())


def _mismatch(path: Path, name: str, what: str) -> IsvitError:
    return IsvitError(f"{path} does not match the {name} architecture: {what}")


def _layer_weight(tensors: dict, layer_name: str, layer: nn.Module, info, path: Path, name: str) -> torch.Tensor:
    """The dequantized weight of one quantized layer, after checking it against the model."""
    expected = list(layer.weight.shape)
    try:
        bits, shape = int(info["bits"]), [int(s) for s in info["shape"]]
    except (KeyError, TypeError, ValueError):
        raise IsvitError(f"{path} has a damaged 'quantized_weights' entry for {layer_name}") from None
    if shape != expected:
        raise _mismatch(path, name, f"{layer_name}.weight has shape {tuple(shape)} in the file, the model expects {tuple(expected)}")
    if bits != layer.weight_quantizer.bits:
        raise _mismatch(path, name, f"{layer_name} has {bits}-bit weights but the file's config says {layer.weight_quantizer.bits}")
    scale = tensors.get(f"{layer_name}.weight_quantizer.scale")
    zero_point = tensors.get(f"{layer_name}.weight_quantizer.zero_point")
    packed = tensors.get(layer_name + CODES_SUFFIX)
    if scale is None or zero_point is None or packed is None:
        raise IsvitError(f"{path} lacks the codes or the grid of {layer_name}'s weight")
    if scale.numel() not in (1, shape[0]) or zero_point.numel() != scale.numel():
        raise IsvitError(f"{path} has a grid of {scale.numel()} channels for {layer_name}'s {shape[0]} output channels")
    try:
        codes = unpack_codes(packed, bits, shape)
    except ValueError as exc:
        raise IsvitError(f"{path} has damaged codes for {layer_name}: {exc}") from None
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise IsvitError(f"{path} has codes outside 0..{2 ** bits - 1} for {layer_name}")
    return dequantize_weight(codes, scale, zero_point)


def float_state_dict(model: nn.Module, tensors: dict, layers: dict, path: Path, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors as the wrapped model's ``state_dict()``: codes turned back into weights."""
    modules = dict(quantized_layers(model))
    missing = [n for n in modules if n not in layers]
    unexpected = [n for n in layers if n not in modules]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise _mismatch(path, name, f"{len(missing)} quantized layers missing and {len(unexpected)} unexpected (e.g. {example})")
    state = dict(tensors)
    for layer_name, layer in modules.items():
        state[f"{layer_name}.weight"] = _layer_weight(tensors, layer_name, layer, layers[layer_name], path, name)
        del state[layer_name + CODES_SUFFIX]
        zero_point_key = f"{layer_name}.weight_quantizer.zero_point"
        state[zero_point_key] = state[zero_point_key].float()
    return state


def _check_state_matches(model: nn.Module, state: dict, path: Path, name: str) -> None:
    """Same keys as the model's ``state_dict()``, and the same shapes except for quantizer
    parameters (their shape is state: a per-channel grid may have become per tensor)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise _mismatch(path, name, f"{len(missing)} tensors missing and {len(unexpected)} unexpected (e.g. {example})")
    resizable = {f"{q_name}.{key}" for q_name, q in quantizers(model) for key in q.state_dict()}
    for key, value in expected.items():
        if key not in resizable and state[key].shape != value.shape:
            raise _mismatch(path, name, f"{key} has shape {tuple(state[key].shape)} in the file, the model expects {tuple(value.shape)}")


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a quantized model from a file written by ``save_quantized``, in eval mode on
    ``device``; returns (model, info) with info's keys ``model`` (the architecture name),
    ``model_args``, ``config`` (the method's config, config.py) and ``data_config``."""
    path = Path(path)
    tensors, metadata = read_checkpoint(path)
    name = metadata.get("model", "")
    model_args = metadata_json(metadata, "model_args", path, dict)
    data_config = metadata_json(metadata, "data_config", path, dict)
    layers = metadata_json(metadata, "quantized_weights", path, dict)
    config = metadata_config(metadata, path)
    model = _build_model(name, model_args, config, path)
    state = float_state_dict(model, tensors, layers, path, name)
    _check_state_matches(model, state, path, name)
    model.load_state_dict(state, strict=True)
    info = {"model": name, "model_args": model_args, "config": config, "data_config": data_config}
    return model.to(device).eval(), info
