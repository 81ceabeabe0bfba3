"""One small random model per variant of every registered family, for the adapter contract
(test_contract.py). A family added to ``isvit.families.FAMILIES`` without an entry here fails
that test: every adapter must show it keeps the contract.

Each model has its parameters redrawn so that every part counts (timm's initialisation leaves
heads, LayerScale, relative position biases and post-norms near zero or one, which would hide
errors in the surgery); the arguments are lists, not tuples, so they survive a checkpoint's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


@dataclass(frozen=True)
class Example:
    timm_name: str
    args: dict = field(default_factory=dict)
    img_size: int = 32

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = timm.create_model(self.timm_name, pretrained=False, **self.args).eval()
        redraw(model)
        return model

    def images(self, n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, 3, self.img_size, self.img_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def redraw(model: torch.nn.Module) -> None:
    """Parameters drawn so that every part of the model moves its output."""
    for key, p in model.named_parameters():
        leaf = key.rsplit(".", 1)[-1]
        if leaf.startswith("gamma") or (leaf == "gamma" or key.endswith("ls1.gamma") or key.endswith("ls2.gamma")):
            p.fill_(1.0)
        elif leaf in ("q_bias", "v_bias", "relative_position_bias_table") or (p.dim() == 1 and leaf == "bias"):
            p.normal_(0.0, 0.5)
        elif p.dim() == 1 and "norm" in key and leaf == "weight":
            p.normal_(1.0, 0.2)
        elif p.dim() == 2 and leaf == "weight":
            p.normal_(0.0, p.shape[1] ** -0.5)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == 10:  # the classifier
            module.weight.normal_(0.0, 0.5)


# family name -> its variants (a registered family needs one at least)
EXAMPLES: dict[str, dict[str, Example]] = {
    "vit": {
        "vit": Example("vit_tiny_patch16_224", SMALL),
        "deit-distilled": Example("deit_tiny_distilled_patch16_224", SMALL),
        "feature-tower": Example("vit_tiny_patch16_224", {**SMALL, "num_classes": 0}),
        "aimv2": Example("aimv2_large_patch14_224", SMALL),  # SwiGLU, RmsNorm
    },
    "swin": {
        "swin": Example("swin_tiny_patch4_window7_224",
                        {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 32, "depths": [2, 2],
                         "num_heads": [2, 2], "num_classes": 10}),
    },
    "swinv2": {
        "swinv2": Example("swinv2_tiny_window8_256",
                          {"img_size": 32, "patch_size": 4, "window_size": 4, "embed_dim": 32, "depths": [2, 2],
                           "num_heads": [2, 2], "num_classes": 10}),
    },
    "beit": {
        "beit": Example("beit_base_patch16_224", SMALL),
    },
    "eva": {
        "eva02": Example("eva02_tiny_patch14_224", {**SMALL, "ref_feat_shape": [4, 4]}),
        "dinov3": Example("vit_small_patch16_dinov3", SMALL),
        "rope-mixed": Example("vit_small_patch16_rope_mixed_224", SMALL),
        "pe-core": Example("vit_pe_core_small_patch16_384", SMALL),
    },
    "naflexvit": {
        "naflex-siglip": Example("naflexvit_base_patch16_siglip", {**SMALL, "pos_embed_grid_size": [4, 4]}),
    },
    "hiera": {
        "hiera": Example("hiera_tiny_224", {"img_size": [64, 64], "embed_dim": 16, "num_heads": 1, "stages": [1, 2, 2, 1],
                                            "num_classes": 10}, img_size=64),
    },
    "hieradet": {
        # 16 x 16 tokens in windows of 4, then 8 x 8 padded to windows of 6, 4 x 4 global, 2 x 2
        "sam2-hiera": Example("sam2_hiera_tiny", {"embed_dim": 16, "num_heads": 1, "stages": [1, 2, 2, 1],
                                                  "window_spec": [4, 6, 2, 1], "global_att_blocks": [4],
                                                  "num_classes": 10}, img_size=64),
    },
}
