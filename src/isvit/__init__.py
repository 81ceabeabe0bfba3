"""isvit: post-training quantization of timm Vision Transformers (I&S-ViT, RepQ-ViT, min-max).

    import isvit
    model = isvit.create_model("vit_tiny_patch16_224", weights="vit_tiny.safetensors")
    config = isvit.resolve_data_config(model)
    calib = isvit.load_calibration_images("calib/", isvit.build_transform(config), 32)
    qmodel = isvit.quantize(model, calib, isvit.QuantConfig(method="repq", w_bits=4, a_bits=4))
    loader = isvit.make_loader(isvit.ImageFolderDataset("val/", isvit.build_transform(config)))
    print(isvit.evaluate(qmodel, loader)["top1"])
"""

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
from .pipeline import METHODS, QuantConfig, quantize, quantizers, set_quantizers

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "DataError",
    "ImageFolderDataset",
    "IsvitError",
    "QuantConfig",
    "build_transform",
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
