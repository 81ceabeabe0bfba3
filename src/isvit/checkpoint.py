"""Saving a quantized model to one safetensors file, atomically, and rebuilding it from that file.

The file holds the quantized model's whole ``state_dict()`` (weights after reparameterisation and
bias correction, and every quantizer's parameters) and, as metadata, the timm architecture name, the
``QuantConfig`` and the preprocessing, so that nothing else is needed to rebuild it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

import timm
import torch
from torch import nn

from .errors import IsvitError
from .pipeline import QuantConfig, placement_for
from .wrap import wrap_model

FORMAT = "isvit-fakequant-v1"


def atomic_write(path: Union[str, Path], write) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path``: no half-written file on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_quantized(model: nn.Module, path: Union[str, Path], *, model_name: str, config: QuantConfig, data_config: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "config": json.dumps(config.to_dict()),
        "data_config": json.dumps(data_config),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_quantized(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a quantized model saved by ``save_quantized``; returns (model, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise IsvitError(f"quantized model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise IsvitError(f"cannot read quantized model file {path}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise IsvitError(f"{path} is not an isvit quantized model file")
    config = QuantConfig(**json.loads(metadata["config"]))
    model = timm.create_model(metadata["model"], pretrained=False)
    wrap_model(model, placement_for(config))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IsvitError(f"{path} does not match the {metadata['model']} architecture: {str(exc).splitlines()[0]}") from exc
    info = {"model": metadata["model"], "config": config, "data_config": json.loads(metadata["data_config"])}
    return model.to(device).eval(), info
