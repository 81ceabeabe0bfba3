"""Hugging Face ``transformers`` checkpoints renamed to the keys of the timm model the user names.

A checkpoint written by ``save_pretrained`` (``model.safetensors``, or ``pytorch_model.bin`` from
older releases) holds the same tensors as timm's model under other names, with q, k and v as three
Linears where timm has one fused ``qkv``. ``to_timm`` renames (and fuses) them; ``models.load_weights``
then loads the result strictly, as it loads a timm state dict. Families:

- ViT: ``ViTModel``, ``ViTForImageClassification`` -> ``VisionTransformer`` (e.g. vit_base_patch16_224);
- DeiT: ``DeiTForImageClassificationWithTeacher`` (and ``DeiTForImageClassification``, ``DeiTModel``)
  -> ``VisionTransformerDistilled`` (e.g. deit_base_distilled_patch16_224): a transformers DeiT always
  has the distillation token;
- DINOv2: ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> timm's DINOv2 ViTs (vit_small_patch14_dinov2,
  vit_small_patch14_reg4_dinov2); ``Dinov2ForImageClassification`` is refused (``_dinov2``);
- Swin: ``SwinModel``, ``SwinForImageClassification`` -> ``SwinTransformer`` (swin_tiny_patch4_window7_224).

Only the tensors are read, never the checkpoint's config.json: what leaves no trace in the weights
comes from the timm model (activation, image size, LayerNorm eps). transformers' ViT and DeiT configs
default to ``layer_norm_eps=1e-12`` where timm uses 1e-6: such a checkpoint then computes slightly
different outputs in timm (differences around 1e-5 of the features, no change to what it learned).

isvit does not import transformers: the names below are those of its saved files (the same for
4.x and 5.x releases; 5.x renames modules in memory but saves the old names).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import IsvitError

# The backbone's attribute in the task models (``ViTForImageClassification.vit`` ...): its keys carry
# that prefix, the heads (``classifier``, ``cls_classifier`` ...) none. A base model saved on its own
# (``ViTModel``, ``Dinov2Model`` ...) has no prefix: its keys begin ``embeddings.`` / ``encoder.``.
BACKBONE_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "swin.")
BASE_MODEL_PARTS = ("embeddings.", "encoder.")


def is_transformers(state: dict[str, torch.Tensor]) -> bool:
    """Whether the keys are those of a transformers vision model (a backbone prefix, or a bare base
    model's ``embeddings.`` / ``encoder.``)."""
    return any(key.startswith(BACKBONE_PREFIXES + BASE_MODEL_PARTS) for key in state)


def to_timm(state: dict[str, torch.Tensor], model: nn.Module, path) -> dict[str, torch.Tensor]:
    """The checkpoint under ``model``'s timm names; tensors it cannot place keep their transformers
    names, so that the strict load that follows names them as unexpected. A checkpoint of another
    family, or one that the timm model cannot express, is refused with an ``IsvitError``."""
    prefix = next((p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in state)), "")
    keys = _Renaming(state, prefix)
    # Each family's own marker, in its first block or its embeddings.
    if keys.has("embeddings.distillation_token"):
        return _deit(keys, model, path)
    if keys.has("encoder.layers.0.blocks.0.layernorm_before.weight"):
        return _swin(keys, model)
    if keys.has("encoder.layer.0.norm1.weight"):
        return _dinov2(keys, model, path)
    if keys.has("encoder.layer.0.layernorm_before.weight"):
        return _vit(keys, model)
    sample = ", ".join(sorted(state)[:3])
    raise IsvitError(
        f"weights file {path} looks like a Hugging Face transformers checkpoint but not of a ViT, DeiT, DINOv2 "
        f"or Swin model, the ones isvit can convert (its keys include {sample})"
    )


class _Renaming:
    """The checkpoint's tensors, moved one by one to their timm names (``out``); what is never moved
    stays under its transformers name (``left``). A tensor the checkpoint lacks is skipped: the strict
    load then reports the timm key it would have filled as missing."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self.left = dict(state)
        self.prefix = prefix  # of the backbone's keys; heads have none
        self.out: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        """Whether the backbone has ``name``."""
        return self.prefix + name in self.left

    def take(self, key: str) -> torch.Tensor | None:
        return self.left.pop(key, None)

    def move(self, key: str, to: str) -> None:
        if key in self.left:
            self.out[to] = self.left.pop(key)

    def move_layer(self, key: str, to: str) -> None:
        """A Linear's, LayerNorm's or Conv's weight and bias."""
        for part in ("weight", "bias"):
            self.move(f"{key}.{part}", f"{to}.{part}")

    def fuse_qkv(self, q: str, k: str, v: str, to: str) -> None:
        """Three Linears into timm's fused ``qkv``: their output rows stacked as q, k, v."""
        for part in ("weight", "bias"):
            names = [f"{name}.{part}" for name in (q, k, v)]
            if all(name in self.left for name in names):
                self.out[f"{to}.{part}"] = torch.cat([self.left.pop(name) for name in names])

    def drop(self, key: str) -> None:
        self.left.pop(key, None)

    def numbers(self, pattern: str) -> list[int]:
        """The numbers that the regex ``pattern``'s group captures in the keys left (block indices)."""
        found = (re.match(pattern, key) for key in self.left)
        return sorted({int(m.group(1)) for m in found if m})

    def result(self) -> dict[str, torch.Tensor]:
        return {**self.left, **self.out}


# ViT, DeiT and DINOv2 share timm's VisionTransformer: the embeddings and blocks below serve all three.


def _embeddings(keys: _Renaming, model: nn.Module) -> None:
    """Patch embedding, class token and position embeddings (transformers adds the latter to the
    class token and the patches alike, as timm's ViTs do)."""
    p = keys.prefix
    keys.move_layer(f"{p}embeddings.patch_embeddings.projection", "patch_embed.proj")
    cls, pos = keys.take(f"{p}embeddings.cls_token"), keys.take(f"{p}embeddings.position_embeddings")
    if cls is not None and pos is not None and getattr(model, "no_embed_class", False):
        # timm's DINOv2-with-registers ViTs add position embeddings to the patches only: the class
        # token's own is added to the token once here (timm's converter of the original DINOv2 does the same).
        cls, pos = cls + pos[:, :1], pos[:, 1:]
    for tensor, name in ((cls, "cls_token"), (pos, "pos_embed")):
        if tensor is not None:
            keys.out[name] = tensor
    # The token that masked image modelling puts in place of hidden patches: never used by a classifier.
    keys.drop(f"{p}embeddings.mask_token")


def _encoder_block(keys: _Renaming, src: str, dst: str) -> None:
    """One transformer block, ``{p}encoder.layer.{i}.`` -> ``blocks.{i}.``. ViT and DeiT name their
    parts after BERT (layernorm_before, intermediate, output), DINOv2 after its own code (norm1, mlp,
    layer_scale): a checkpoint has one set or the other, so moving both names covers either."""
    keys.move_layer(src + "layernorm_before", dst + "norm1")  # ViT, DeiT
    keys.move_layer(src + "norm1", dst + "norm1")  # DINOv2
    attention = src + "attention.attention."
    keys.fuse_qkv(attention + "query", attention + "key", attention + "value", dst + "attn.qkv")
    keys.move_layer(src + "attention.output.dense", dst + "attn.proj")
    # DINOv2's LayerScale: a per-channel factor on each residual branch, timm's ls1 / ls2.
    keys.move(src + "layer_scale1.lambda1", dst + "ls1.gamma")
    keys.move_layer(src + "layernorm_after", dst + "norm2")  # ViT, DeiT
    keys.move_layer(src + "norm2", dst + "norm2")  # DINOv2
    keys.move_layer(src + "intermediate.dense", dst + "mlp.fc1")  # ViT, DeiT
    keys.move_layer(src + "output.dense", dst + "mlp.fc2")
    keys.move_layer(src + "mlp.fc1", dst + "mlp.fc1")  # DINOv2 (GELU MLP)
    keys.move_layer(src + "mlp.fc2", dst + "mlp.fc2")
    # DINOv2 giant's SwiGLU MLP: weights_in packs gate and value rows as timm's SwiGLUPacked fc1 does
    # (silu(first half) * second half in both).
    keys.move_layer(src + "mlp.weights_in", dst + "mlp.fc1")
    keys.move_layer(src + "mlp.weights_out", dst + "mlp.fc2")
    keys.move(src + "layer_scale2.lambda1", dst + "ls2.gamma")


def _encoder(keys: _Renaming) -> None:
    """All blocks, then the final LayerNorm."""
    p = keys.prefix
    for i in keys.numbers(rf"{re.escape(p)}encoder\.layer\.(\d+)\."):
        _encoder_block(keys, f"{p}encoder.layer.{i}.", f"blocks.{i}.")
    keys.move_layer(f"{p}layernorm", "norm")
    # ViTModel's and DeiTModel's pooler (tanh of a Linear on the class token) has no place in timm,
    # whose features are the normed class token itself; the ForImageClassification models do not
    # use it either (their classifier reads the normed class token), so it is left out.
    keys.drop(f"{p}pooler.dense.weight")
    keys.drop(f"{p}pooler.dense.bias")


def _vit(keys: _Renaming, model: nn.Module) -> dict[str, torch.Tensor]:
    """ViTModel / ViTForImageClassification: the classifier reads the normed class token, as timm's
    ``head`` does (global_pool='token')."""
    _embeddings(keys, model)
    _encoder(keys)
    keys.move_layer("classifier", "head")
    return keys.result()


def _deit(keys: _Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """DeiT: a ViT whose sequence is class token, distillation token, patches, as in timm's
    VisionTransformerDistilled (position embeddings for all of them)."""
    if getattr(model, "dist_token", None) is None:
        raise IsvitError(
            f"weights file {path} holds a Hugging Face DeiT, which has a distillation token: name one of timm's "
            f"distilled DeiTs (such as deit_base_distilled_patch16_224), not {type(model).__name__} without one"
        )
    _embeddings(keys, model)
    keys.move(f"{keys.prefix}embeddings.distillation_token", "dist_token")
    _encoder(keys)
    if "cls_classifier.weight" in keys.left:
        # DeiTForImageClassificationWithTeacher: logits = (cls_classifier(class token) +
        # distillation_classifier(distillation token)) / 2, timm's (head + head_dist) / 2 in eval mode.
        keys.move_layer("cls_classifier", "head")
        keys.move_layer("distillation_classifier", "head_dist")
    elif "classifier.weight" in keys.left and isinstance(getattr(model, "head_dist", None), nn.Linear):
        # DeiTForImageClassification: logits = classifier(class token) alone. timm's distilled model
        # averages its two heads, so head gets twice the classifier and head_dist zeros:
        # (2 W c + 2 b + 0) / 2 = W c + b, exactly (doubling and halving are exact in floating point).
        weight, bias = keys.take("classifier.weight"), keys.take("classifier.bias")
        keys.out["head.weight"], keys.out["head_dist.weight"] = 2 * weight, torch.zeros_like(weight)
        if bias is not None:
            keys.out["head.bias"], keys.out["head_dist.bias"] = 2 * bias, torch.zeros_like(bias)
    return keys.result()


def _dinov2(keys: _Renaming, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """Dinov2Model / Dinov2WithRegistersModel: LayerScale blocks; register tokens follow the class
    token in both (timm's ``reg_token``)."""
    if "classifier.weight" in keys.left:
        # Dinov2ForImageClassification classifies [class token, mean of the patch tokens]
        # concatenated: no timm head pools that way.
        raise IsvitError(
            f"weights file {path} holds a Hugging Face Dinov2ForImageClassification, whose classifier reads the "
            f"class token and the mean patch token side by side, which no timm head computes: isvit converts "
            f"its backbone only, saved on its own (model.dinov2.save_pretrained) and named as a timm DINOv2 "
            f"such as vit_small_patch14_dinov2"
        )
    _embeddings(keys, model)
    keys.move(f"{keys.prefix}embeddings.register_tokens", "reg_token")
    _encoder(keys)
    return keys.result()


def _swin(keys: _Renaming, model: nn.Module) -> dict[str, torch.Tensor]:
    """SwinModel / SwinForImageClassification -> timm's SwinTransformer."""
    p = keys.prefix
    keys.move_layer(f"{p}embeddings.patch_embeddings.projection", "patch_embed.proj")
    keys.move_layer(f"{p}embeddings.norm", "patch_embed.norm")
    keys.drop(f"{p}embeddings.mask_token")
    # transformers (like the original Swin) ends a stage with its patch merging: stage s's
    # ``downsample`` halves the resolution for stage s + 1. timm (since 0.9) starts stage s + 1 with
    # it instead, so stage s's merging moves one stage on; a timm model with merging in stage 0 has
    # the old layout and keeps the numbers.
    later = 0 if "layers.0.downsample.reduction.weight" in model.state_dict() else 1
    for s in keys.numbers(rf"{re.escape(p)}encoder\.layers\.(\d+)\."):
        stage = f"{p}encoder.layers.{s}."
        for b in keys.numbers(rf"{re.escape(stage)}blocks\.(\d+)\."):
            src, dst = f"{stage}blocks.{b}.", f"layers.{s}.blocks.{b}."
            keys.move_layer(src + "layernorm_before", dst + "norm1")
            attention = src + "attention.self."
            keys.fuse_qkv(attention + "query", attention + "key", attention + "value", dst + "attn.qkv")
            # The learned bias per relative offset in a window; both index it the same way (the
            # original Swin's relative_position_index, which timm recomputes: a buffer it does not save).
            keys.move(attention + "relative_position_bias_table", dst + "attn.relative_position_bias_table")
            keys.drop(attention + "relative_position_index")
            keys.move_layer(src + "attention.output.dense", dst + "attn.proj")
            keys.move_layer(src + "layernorm_after", dst + "norm2")
            keys.move_layer(src + "intermediate.dense", dst + "mlp.fc1")
            keys.move_layer(src + "output.dense", dst + "mlp.fc2")
        # Patch merging concatenates each 2x2 neighbourhood's features in the same order in both,
        # (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1), so its LayerNorm over the
        # 4C channels and its reduction need no permutation.
        keys.move_layer(f"{stage}downsample.norm", f"layers.{s + later}.downsample.norm")
        keys.move(f"{stage}downsample.reduction.weight", f"layers.{s + later}.downsample.reduction.weight")
    keys.move_layer(f"{p}layernorm", "norm")
    # The classifier reads the mean of the last stage's tokens, as timm's head (global average pool, fc).
    keys.move_layer("classifier", "head.fc" if "head.fc.weight" in model.state_dict() else "head")
    return keys.result()
