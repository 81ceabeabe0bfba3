"""Building a timm model and loading its weights from a file (or timm's hub when none is given)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from . import hf
from .errors import IsvitError
from .wrap import check_supported


def create_model(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu", *, quantizable: bool = False
) -> nn.Module:
    """A timm model in eval mode: weights from ``weights`` or, without a path, timm's pretrained
    download (``load_model``, whose model arguments it leaves out)."""
    return load_model(name, weights, device, quantizable=quantizable)[0]


def load_model(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu", *, quantizable: bool = False
) -> tuple[nn.Module, dict]:
    """A timm model in eval mode and the model arguments it was built with (``build_model``; record
    them with a quantized model so that it rebuilds the same).

    Weights from ``weights``: safetensors or a PyTorch state dict, timm's or a Hugging Face
    transformers checkpoint (ViT, DeiT, DINOv2, SigLIP, Swin, DINOv3), or the folder transformers'
    ``save_pretrained`` wrote (one weights file or shards; its config.json's image size, activation
    and LayerNorm eps become the model's arguments, ``hf.config_model_args``); loaded strictly.
    Without a path, timm's pretrained download (no arguments).

    With ``quantizable``, an architecture that isvit cannot quantize (``wrap.check_supported``) is
    refused before any weights are read or downloaded: the architecture is built first, with random
    weights (for a download, that costs one extra build of the model). Everything in a folder is
    checked (its config, that its weights files are there) before the weights are read.
    """
    if not timm.is_model(name):
        raise IsvitError(f"unknown model {name!r}: give a timm architecture name such as vit_tiny_patch16_224")
    model_args: dict = {}  # none for a weights file or a download
    if quantizable or weights is not None:
        model = timm.create_model(name, pretrained=False)
        if weights is not None and Path(weights).is_dir():
            model, model_args = _as_configured(name, model, Path(weights))
        if quantizable:
            check_supported(model)
    if weights is None:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # network errors, missing pretrained tags ...
            raise IsvitError(
                f"could not download pretrained weights for {name} ({type(exc).__name__}): pass --weights PATH"
            ) from exc
    else:
        load_weights(model, weights)
    return model.to(device).eval(), model_args


def _as_configured(name: str, model: nn.Module, folder: Path) -> tuple[nn.Module, dict]:
    """timm's ``name`` (``model``, built with its defaults) as a save_pretrained folder's config.json
    describes it, and the arguments that make it so (``hf.config_model_args``; none without a
    transformers config). The folder's weights files are checked to be there first."""
    hf.weights_files(folder)
    config = hf.read_config(folder)
    model_args = hf.config_model_args(config, model, name, folder) if config is not None else {}
    if not model_args:
        return model, {}
    where = f"{folder / 'config.json'}"
    model = build_model(name, model_args, where=where)
    # An argument timm takes but does not apply everywhere (Eva's SwiGLU keeps SiLU) leaves a difference.
    left = hf.config_model_args(config, model, name, folder)
    if left:
        raise IsvitError(f"{where} describes a model that timm's {name} cannot express: built with "
                         f"{model_args} it still needs {left}")
    return model, model_args


def build_model(name: str, model_args: dict, where: str = "the model arguments") -> nn.Module:
    """timm's ``name`` with random weights, built with ``model_args``: timm's keyword arguments and
    isvit's ``layer_norm_eps``, the eps given to every LayerNorm of the model (as a transformers
    config's ``layer_norm_eps`` is to all of its). ``img_size`` also becomes the input size of the
    model's preprocessing (timm's pretrained config keeps the default size). A ``TypeError`` or
    ``ValueError`` of timm (an argument the model does not take) becomes an ``IsvitError`` that
    names ``where`` the arguments come from."""
    timm_args = {k: v for k, v in model_args.items() if k != "layer_norm_eps"}
    try:
        model = timm.create_model(name, pretrained=False, **timm_args)
    except (TypeError, ValueError, AssertionError) as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in timm_args.items())
        raise IsvitError(f"timm's {name} cannot be built with {given} (from {where}): {exc}") from None
    eps = model_args.get("layer_norm_eps")
    if eps is not None:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = eps
    size = model_args.get("img_size")
    if size is not None and isinstance(getattr(model, "pretrained_cfg", None), dict):
        height, width = (size, size) if isinstance(size, int) else size
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, height, width)}
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a ``torch.save``d state dict (also nested under
    'model' / 'state_dict' keys, as training checkpoints often are), or of the weights files of a
    ``save_pretrained`` folder (``hf.weights_files``: one file, or the shards of an index)."""
    path = Path(path)
    if path.is_dir():
        state = {}
        for file in hf.weights_files(path):
            state.update(read_state_dict(file))
        return state
    if not path.is_file():
        raise IsvitError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IsvitError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IsvitError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict strictly, with one clear sentence about missing or unexpected keys.

    ``path`` is a weights file or a ``save_pretrained`` folder (``read_state_dict``; the folder's
    config.json is read by ``load_model``, not here). A Hugging Face transformers checkpoint (ViT,
    DeiT, DINOv2, SigLIP, Swin, DINOv3: ``hf.to_timm``) is first renamed to the timm model's keys; a
    state dict that already has them is loaded as it is.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    source = ""
    if hf.is_transformers(state) and not set(state) <= set(expected):
        state = hf.to_timm(state, model, path)
        source = " (a Hugging Face transformers checkpoint, renamed to timm's keys)"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise IsvitError(
            f"weights file {path}{source} does not match {type(model).__name__}: {' and '.join(parts)}"
        )
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise IsvitError(
            f"weights file {path}{source} does not match the model: {k} has shape {tuple(state[k].shape)}, "
            f"expected {tuple(expected[k].shape)}"
        )
    model.load_state_dict(state, strict=True)
