"""isvit: post-training quantization of timm Vision Transformers (I&S-ViT, RepQ-ViT, min-max).

    import isvit
    model = isvit.create_model("vit_tiny_patch16_224", weights="vit_tiny.safetensors")
    data_config = isvit.resolve_data_config(model)
    calib = isvit.load_calibration_images("calib/", isvit.build_transform(data_config), 32)
    qmodel = isvit.quantize(model, calib, isvit.RepqConfig(w_bits=4, a_bits=4))
    loader = isvit.make_loader(isvit.ImageFolderDataset("val/", isvit.build_transform(data_config)))
    print(isvit.evaluate(qmodel, loader)["top1"])

The methods' configs (``IsvitConfig``, ``RepqConfig``, ``MinmaxConfig``), isvit's presets and the
``Reconstruction`` settings are in ``isvit.config``.
"""

from .config import (
    METHODS,
    PRESETS,
    IsvitConfig,
    MinmaxConfig,
    QuantConfig,
    Reconstruction,
    RepqConfig,
    config_from_dict,
)
from .data import (
    ImageFolderDataset,
    build_transform,
    load_calibration_images,
    make_loader,
    resolve_data_config,
)
from .errors import DataError, IsvitError
from .evaluate import evaluate
from .models import create_model, load_weights
from .pipeline import quantize, quantizers, set_quantizers

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "PRESETS",
    "DataError",
    "ImageFolderDataset",
    "IsvitConfig",
    "IsvitError",
    "MinmaxConfig",
    "QuantConfig",
    "Reconstruction",
    "RepqConfig",
    "build_transform",
    "config_from_dict",
    "create_model",
    "evaluate",
    "load_calibration_images",
    "load_weights",
    "make_loader",
    "quantize",
    "quantizers",
    "resolve_data_config",
    "set_quantizers",
]
