"""How the files beside this script were made: checkpoints written by isvit before the per-method
configs (commit 934a8f1, one ``QuantConfig`` saved as a flat dict) of a tiny random ViT by every
method, their logits on 4 seeded images (logits.safetensors), and isvit_fast_w4a4.onnx exported
from the first (``isvit export --quantized isvit_fast_w4a4.safetensors --onnx isvit_fast_w4a4.onnx``).
tests/test_config.py checks that today's isvit still reads them. Run at that commit:
``PYTHONPATH=src python tests/data/quantconfig_files/make.py OUT_DIR``."""
import sys
import warnings

import timm
import torch
from safetensors.torch import save_file

import isvit
from isvit.checkpoint import save_quantized

out = sys.argv[1]
torch.set_num_threads(1)
ARGS = {"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
calib, test = images(16, 1), images(4, 2)
configs = {
    "isvit_fast_w4a4": isvit.QuantConfig(method="isvit", preset="fast", w_bits=4, a_bits=4, calib_size=16, iters=3, batch_size=8),
    "isvit_paper_w6a6": isvit.QuantConfig(method="isvit", w_bits=6, a_bits=6, calib_size=16, iters=3, batch_size=8, reparameterize=False, drop_prob=0.25),
    "repq_w4a4": isvit.QuantConfig(method="repq", w_bits=4, a_bits=4, calib_size=16),
    "minmax_w8a8": isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=16, rotate=True),
}
logits = {}
for name, cfg in configs.items():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARGS).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = isvit.quantize(m, calib, cfg, progress=False)
    save_quantized(q, f"{out}/{name}.safetensors", model_name="vit_tiny_patch16_224", config=cfg,
                   data_config={"input_size": [3, 32, 32]}, model_args=ARGS)
    with torch.no_grad():
        logits[name] = q(test).contiguous()
save_file(logits, f"{out}/logits.safetensors")
print("ok")
