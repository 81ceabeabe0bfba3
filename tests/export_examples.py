"""The small models and files that the export tests share (test_export.py, test_openvino.py,
test_openvino_ir.py): one-block ViT and Swin settings, quantized and exported to ONNX, a tiny
full-precision export, and the damaged ONNX files each runtime must refuse in one sentence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

import isvit
from isvit.export import export_onnx

from conftest import method_config, random_images, truncated

# One block each where one suffices: tracing for ONNX costs seconds per block.
VIT = ("vit_tiny_patch16_224", {"depth": 1, "img_size": 64, "num_classes": 10})
# 56 pixels: 14x14 then 7x7 tokens, neither a multiple of the window of 4, so timm pads the windows
# and the blocks keep a per-channel post-LayerNorm quantizer before qkv (not folded).
SWIN = ("swin_tiny_patch4_window7_224",
        {"embed_dim": 32, "depths": [2, 1], "num_heads": [2, 4], "img_size": 56, "window_size": 4, "num_classes": 10})
ARCHITECTURES = {"vit": VIT, "swin": SWIN}


def small_model(arch: str) -> torch.nn.Module:
    name, args = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **args).eval()


def img_size(arch: str) -> int:
    return ARCHITECTURES[arch][1]["img_size"]


def data_config(arch: str) -> dict:
    return isvit.resolve_data_config(small_model(arch), input_size=img_size(arch))


def quantized(arch: str, method: str, bits: int):
    config = method_config(method=method, w_bits=bits, a_bits=bits, calib_size=16, iters=1 if method == "isvit" else None, batch_size=8 if method == "isvit" else None)
    return isvit.quantize(small_model(arch), random_images(16, img_size(arch), seed=1), config, progress=False), config


def export_settings(settings, folder: Path) -> dict:
    """Each (arch, method, bits) of ``settings`` quantized and exported into ``folder``:
    {setting: (model, config, path, products)}."""
    found = {}
    for arch, method, bits in settings:
        model, config = quantized(arch, method, bits)
        path = folder / f"{arch}_{method}_w{bits}.onnx"
        name, args = ARCHITECTURES[arch]
        counts = export_onnx(model, path, model_name=name, config=config, data_config=data_config(arch), model_args=args)
        found[(arch, method, bits)] = (model, config, path, counts)
    return found


TINY = {"depth": 1, "img_size": 32, "num_classes": 10}


def export_tiny_fp32(path: Path) -> torch.nn.Module:
    """A one-block full-precision ViT on 32x32 images, exported to ``path`` (the quickest export)."""
    torch.manual_seed(0)
    model = timm.create_model(VIT[0], pretrained=False, **TINY).eval()
    config = isvit.resolve_data_config(model, input_size=32)
    assert export_onnx(model, path, model_name=VIT[0], config=None, data_config=config, model_args=TINY) == \
        {"integer": 0, "float": 0}
    return model


def with_metadata(source: Path, target: Path, **changes) -> Path:
    proto = onnx.load(str(source))
    metadata = {p.key: p.value for p in proto.metadata_props}
    metadata.update(changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    del proto.metadata_props[:]
    helper.set_model_props(proto, metadata)
    onnx.save_model(proto, str(target))
    return target


def plain_onnx(source: Path, target: Path) -> Path:
    """A valid ONNX model that is not isvit's: y = x + 1."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["images", "one"], ["logits"])], "plain",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.ones(3, dtype=np.float32), "one")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(target))
    return target


def random_bytes(source: Path, target: Path) -> Path:
    target.write_bytes(bytes(range(256)) * 16)
    return target


BAD_ONNX = {
    "missing": (lambda source, t: t, "does not exist"),
    "random bytes": (random_bytes, "cannot load ONNX model file"),
    "truncated": (truncated, "cannot load ONNX model file"),
    "not isvit's": (plain_onnx, "is not an ONNX model exported by isvit"),
    "metadata stripped": (lambda source, t: with_metadata(source, t, format=None), "is not an ONNX model exported by isvit"),
    "other version": (lambda source, t: with_metadata(source, t, format="isvit-onnx-v99"),
                      "has format 'isvit-onnx-v99', which this isvit cannot read"),
    "damaged config": (lambda source, t: with_metadata(source, t, config="{not json"), "no valid 'config' entry"),
    "damaged preprocessing": (lambda source, t: with_metadata(source, t, data_config="[]"), "no valid 'data_config' entry"),
}
