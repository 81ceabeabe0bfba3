"""Hugging Face ``transformers`` checkpoints renamed to the keys of the timm model the user names.

A checkpoint written by ``save_pretrained`` (``model.safetensors``, or ``pytorch_model.bin`` from
older releases) holds the same tensors as timm's model under other names, with q, k and v as three
Linears where timm has one fused ``qkv``. ``to_timm`` renames (and fuses) them; ``models.load_weights``
then loads the result strictly, as it loads a timm state dict. Each family's renamer is in its file
under ``isvit/families/`` (``Family.from_transformers``): ViT, DeiT, DINOv2 and SigLIP in ``vit.py``,
Swin in ``swin.py``, DINOv3 in ``eva.py``.

``--weights`` may also name the folder ``save_pretrained`` wrote (``read_folder``): its one weights
file, or the shards its index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``)
lists, and its ``config.json`` (``read_config``). Of the config, what the weights leave no trace of
and timm can be told becomes keyword arguments of the timm model (``config_model_args``): the image
size (``img_size``), the MLP's activation (``act_layer``) and the LayerNorm eps (``layer_norm_eps``,
isvit's own: ``models.build_model`` sets it on every LayerNorm, as transformers gives one eps to all
of them; its Swin alone keeps PyTorch's 1e-5 in the patch embedding's and merging's norms, and every
published Swin config says 1e-5, timm's, so none is set there), and what a family reads itself
(``Family.config_args``: DINOv3's ``rope_theta``, SigLIP 2 NaFlex's ``num_patches``). They are
recorded in a quantized model's ``model_args``, so that it rebuilds the same.
A single weights file comes without a config: its model is the timm model as named.

isvit does not import transformers: the renamers use the names of its saved files (the same for
4.x and 5.x releases; 5.x renames modules in memory but saves the old names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from . import families
from .errors import IsvitError
from .families import listing

# A base model saved on its own (``ViTModel``, ``Dinov2Model`` ...) has no prefix: its keys begin
# ``embeddings.`` / ``encoder.``. The task models' keys carry the backbone's attribute as a prefix
# (``ViTForImageClassification.vit``: ``Family.transformers_prefixes``), the heads' none.
BASE_MODEL_PARTS = ("embeddings.", "encoder.")


def backbone_prefixes() -> tuple[str, ...]:
    """The backbone prefixes of every registered family's task models ("vit.", "swin." ...)."""
    return tuple(prefix for family in families.FAMILIES for prefix in family.transformers_prefixes)


def is_transformers(state: dict[str, torch.Tensor]) -> bool:
    """Whether the keys are those of a transformers vision model (a backbone prefix, or a bare base
    model's ``embeddings.`` / ``encoder.``)."""
    return any(key.startswith(backbone_prefixes() + BASE_MODEL_PARTS) for key in state)


def to_timm(state: dict[str, torch.Tensor], model: nn.Module, path) -> dict[str, torch.Tensor]:
    """The checkpoint under ``model``'s timm names; tensors it cannot place keep their transformers
    names, so that the strict load that follows names them as unexpected. A checkpoint of another
    family, or one that the timm model cannot express, is refused with an ``IsvitError``."""
    prefix = next((p for p in backbone_prefixes() if any(k.startswith(p) for k in state)), "")
    keys = Renaming(state, prefix)
    # Each family recognises its checkpoints by their own keys (markers in the first block or the embeddings).
    for family in families.FAMILIES:
        renamed = family.from_transformers(keys, model, path)
        if renamed is not None:
            return renamed
    sample = ", ".join(sorted(state)[:3])
    names = listing([name for family in families.FAMILIES for name in family.transformers_names], "or")
    raise IsvitError(
        f"weights file {path} looks like a Hugging Face transformers checkpoint but not of a {names} model, "
        f"the ones isvit can convert (its keys include {sample})"
    )


class Renaming:
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


# ---------------------------------------------------------------------------------------------
# save_pretrained folders: the weights (one file or shards) and config.json
# ---------------------------------------------------------------------------------------------

# The weights file names save_pretrained writes, in the order they are looked for: one file, or the
# index of its shards (``weight_map``: tensor name -> shard file in the same folder).
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weights_files(folder: Path) -> list[Path]:
    """The weights files of a save_pretrained folder: its one weights file or the shards its index
    lists (an ``IsvitError`` where it has neither, or where the index is damaged or names a shard
    the folder lacks)."""
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            files = list(weight_map.values()) if isinstance(weight_map, dict) else []
            if not files or not all(isinstance(f, str) for f in files):
                raise IsvitError(f"{index} has no weight_map of tensor names to shard files")
            shards = [folder / f for f in dict.fromkeys(files)]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise IsvitError(f"{index} names the shard {missing[0]}, which is not in {folder}")
            return shards
    names = listing(list(WEIGHTS_FILES + INDEX_FILES), "or")
    raise IsvitError(f"the folder {folder} holds no weights: isvit looks for {names}")


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (an ``IsvitError`` where it is not one)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IsvitError(f"cannot read {path} as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise IsvitError(f"{path} does not hold a JSON object")
    return value


def read_config(folder: Path) -> dict | None:
    """The transformers config in the folder's ``config.json`` (a multimodal model's
    ``vision_config``), or None where there is none: no file, or one without transformers'
    ``model_type`` (timm's hub folders have a config.json of their own)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    if "model_type" not in config:
        return None
    vision = config.get("vision_config")
    return vision if isinstance(vision, dict) else config


# transformers' ``hidden_act`` names -> timm's ``act_layer`` names of the same function
# (gelu_new is the tanh approximation written out: it differs from torch's by rounding only).
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}
# What each of those computes, to tell which one a timm model's activation module is.
_PROBE = torch.linspace(-4, 4, 33)
_FUNCTIONS = {
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
}


def activation_of(model: nn.Module) -> str | None:
    """timm's name of the function the first MLP's activation (``...mlp.act``) computes, or None
    where there is no such module or it is none of ``_FUNCTIONS``."""
    act = next((m for name, m in model.named_modules() if name.endswith("mlp.act")), None)
    if act is None:
        return None
    with torch.no_grad():
        out = act(_PROBE.clone())
    return next((name for name, f in _FUNCTIONS.items() if torch.allclose(out, f(_PROBE), atol=1e-6, rtol=0)), None)


def layernorm_eps(model: nn.Module) -> float | None:
    """The eps of the model's blocks' LayerNorms (the first ``norm1``'s), or None without one."""
    norm = next((m for name, m in model.named_modules() if name.endswith("norm1")), None)
    return norm.eps if isinstance(norm, nn.LayerNorm) else None


def config_model_args(config: dict, model: nn.Module, name: str, path) -> dict:
    """The timm keyword arguments (``img_size``, ``act_layer``, and isvit's ``layer_norm_eps``) with
    which timm's ``name``, built as ``model`` with its defaults, becomes the model the config
    describes; only what differs. A config value that no argument expresses, or a malformed one, is
    refused in one sentence (``path`` is the config's folder)."""
    args = {}
    where = f"{Path(path) / 'config.json'}"
    size = config.get("image_size")
    if size is not None:
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise IsvitError(f"{where} has image_size {config['image_size']!r}, not a positive side or [height, width]")
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is None:
            raise IsvitError(f"{where} says the model takes {size[0]}x{size[1]} images, but timm's {name} has no "
                             "image size to set (img_size)")
        if tuple(img_size) != tuple(size):
            args["img_size"] = size[0] if size[0] == size[1] else list(size)
    act = config.get("hidden_act")
    if config.get("use_swiglu_ffn"):  # DINOv2's SwiGLU MLP computes SiLU whatever hidden_act says
        act = "silu"
    if act is not None:
        if act not in ACTIVATIONS:
            raise IsvitError(f"{where} has hidden_act {act!r}, which isvit cannot give a timm model: it knows "
                             f"{listing(sorted(ACTIVATIONS), 'and')}")
        if activation_of(model) != ACTIVATIONS[act]:
            args["act_layer"] = ACTIVATIONS[act]
    eps = config.get("layer_norm_eps")
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise IsvitError(f"{where} has layer_norm_eps {eps!r}, not a small non-negative number")
        if layernorm_eps(model) not in (None, eps):
            args["layer_norm_eps"] = float(eps)
    return {**args, **families.family_of(model).config_args(config, model, where)}
