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
    """A timm model in eval mode: weights from ``weights`` (safetensors or a PyTorch state dict, timm's
    or a Hugging Face transformers ViT, DeiT, DINOv2 or Swin checkpoint; loaded strictly) or, without a
    path, timm's pretrained download.

    With ``quantizable``, an architecture that isvit cannot quantize (``wrap.check_supported``) is
    refused before any weights are read or downloaded: the architecture is built first, with random
    weights (for a download, that costs one extra build of the model).
    """
    if not timm.is_model(name):
        raise IsvitError(f"unknown model {name!r}: give a timm architecture name such as vit_tiny_patch16_224")
    if quantizable or weights is not None:
        model = timm.create_model(name, pretrained=False)
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
    return model.to(device).eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a ``torch.save``d state dict (also nested under
    'model' / 'state_dict' keys, as training checkpoints often are)."""
    path = Path(path)
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

    A Hugging Face transformers checkpoint (ViT, DeiT, DINOv2, Swin: ``hf.to_timm``) is first renamed
    to the timm model's keys; a state dict that already has them is loaded as it is.
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
