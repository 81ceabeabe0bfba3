"""The family registry (isvit.families): every registered adapter provides the whole interface, no
module outside the package names a family, a family registered from outside works end to end, and
every family's checks run before any module is swapped."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from timm.layers import RmsNorm
from torch import nn

import isvit
from isvit import families
from isvit.errors import IsvitError
from isvit.families.base import Family, Head, Unit, check_layernorm
from isvit.modules import QuantConv2d, QuantLinear
from isvit.quantizers import Quantizer
from isvit.rotate import rotate_model
from isvit.wrap import (
    Placement,
    architecture,
    check_supported,
    forward_units,
    is_block,
    post_layernorm_pairs,
    wrap_model,
)

from conftest import agreement, method_config, random_images, small_swin

SOURCE = Path(isvit.__file__).parent


# ---------------------------------------------------------------------------------------------
# The registered families
# ---------------------------------------------------------------------------------------------

def overrides(family: Family, method: str) -> bool:
    return getattr(type(family), method) is not getattr(Family, method)


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_every_registered_family_provides_the_whole_interface(family):
    assert family.name and family.description and family.model_types and family.block_types
    assert all(isinstance(t, type) for t in (*family.model_types, *family.block_types))
    # rotation: both methods where the family rotates, else the reason it does not
    if family.rotation_name is not None:
        assert overrides(family, "check_rotation") and overrides(family, "rotate")
    else:
        assert family.no_rotation and not overrides(family, "rotate")
    # Hugging Face renamer: its prefixes and names where it has one, neither where not
    has_renamer = overrides(family, "from_transformers")
    assert bool(family.transformers_prefixes) == has_renamer == bool(family.transformers_names)


def test_family_names_are_unique_and_a_second_registration_is_refused(monkeypatch):
    names = [f.name for f in families.FAMILIES]
    assert len(set(names)) == len(names)
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    with pytest.raises(ValueError, match="already registered"):
        families.register_family(type(families.FAMILIES[0])())


def _names_used(tree: ast.AST) -> tuple[set[str], set[str], set[str]]:
    """(string constants, identifiers, imported modules) of a parsed source file."""
    strings, identifiers, imported = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
        elif isinstance(node, ast.Name):
            identifiers.add(node.id)
        elif isinstance(node, ast.Attribute):
            identifiers.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            identifiers.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return strings, identifiers, imported


def test_no_module_outside_the_families_package_names_a_family():
    family_names = {f.name for f in families.FAMILIES} | {p for f in families.FAMILIES for p in f.transformers_prefixes}
    timm_classes = {t.__name__ for f in families.FAMILIES for t in (*f.model_types, *f.block_types)}
    found = []
    for path in sorted(SOURCE.glob("*.py")):  # isvit/*.py: everything but isvit/families/
        strings, identifiers, imported = _names_used(ast.parse(path.read_text()))
        found += [f"{path.name}: the string {s!r}" for s in strings & family_names]
        found += [f"{path.name}: {name}" for name in identifiers & timm_classes]
        found += [f"{path.name}: imports {m}" for m in imported if m.startswith("timm.models")]
    assert found == []


# ---------------------------------------------------------------------------------------------
# A family registered from outside: a tiny MLP-only token mixer, not a timm model
# ---------------------------------------------------------------------------------------------

class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TinyNet(nn.Module):
    """8x8 patches of a 32x32 image -> 16 tokens -> blocks -> LayerNorm -> mean token -> head."""

    def __init__(self, dim: int = 16, depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x):
        return x.flatten(2).transpose(1, 2)

    def forward_head(self, x):
        return self.head(x.mean(1))

    def forward(self, x):
        x = self.tokens(self.patch_embed(x))
        for block in self.blocks:
            x = block(x)
        return self.forward_head(self.norm(x))


class Tiny(Family):
    """The whole adapter of TinyNet."""

    name = "tiny"
    description = "TinyNet"
    model_types = (TinyNet,)
    block_types = (TinyBlock,)
    no_rotation = "the test family has none"

    def check(self, model):
        for i, block in enumerate(model.blocks):
            check_layernorm(block.norm, f"blocks.{i}.norm")

    def wrap(self, model, p: Placement):
        model.patch_embed = QuantConv2d(model.patch_embed, p.weight())
        for block in model.blocks:
            block.fc1 = p.linear(block.fc1, "post_ln")
            block.fc2 = p.linear(block.fc2, "tensor")
        model.head = p.linear(model.head, "tensor")

    def units(self, model):
        return [Unit("patch_embed", model.patch_embed, post=model.tokens),
                *[Unit(f"blocks.{i}", block) for i, block in enumerate(model.blocks)],
                Unit("head", Head(model), pre=model.norm)]

    def post_layernorm_pairs(self, model):
        return [(f"blocks.{i}.norm", block.norm, block.fc1) for i, block in enumerate(model.blocks)]


@pytest.fixture
def tiny_family(monkeypatch):
    """Tiny registered for the test only (the registry as it was afterwards)."""
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    return families.register_family(Tiny())


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():  # LayerNorm affines and biases that matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        model.head.weight.mul_(4.0)
    return model


def test_an_unregistered_model_is_refused_naming_the_registered_families():
    with pytest.raises(IsvitError, match="isvit supports timm VisionTransformer.* models, not TinyNet"):
        check_supported(tiny_net())


def test_a_registered_family_is_wrapped_cut_into_units_and_folded(tiny_family):
    model = tiny_net()
    assert architecture(model) == "tiny"
    wrapped = wrap_model(copy.deepcopy(model), Placement(w_bits=8, a_bits=8))
    assert isinstance(wrapped.patch_embed, QuantConv2d)
    assert all(isinstance(m, QuantLinear) for m in wrapped.modules() if isinstance(m, nn.Linear))
    isvit.set_quantizers(wrapped, False)
    x = random_images(4, 32, seed=1)
    with torch.no_grad():
        expected = model(x)
        through_units = x
        for unit in forward_units(wrapped):
            through_units = unit(through_units)
        assert torch.allclose(wrapped(x), expected, atol=1e-6) and torch.allclose(through_units, expected, atol=1e-6)
    assert [is_block(u.body) for u in forward_units(wrapped)] == [False, True, True, False]
    assert [name for name, _, _ in post_layernorm_pairs(wrapped)] == ["blocks.0.norm", "blocks.1.norm"]


@pytest.mark.parametrize("method", ["minmax", "repq"])
def test_a_registered_family_quantizes_at_w8a8_close_to_full_precision(tiny_family, method):
    model = tiny_net()
    config = method_config(method=method, w_bits=8, a_bits=8, calib_size=16)
    quantized = isvit.quantize(model, random_images(16, 32, seed=2), config, progress=False)
    x = random_images(32, 32, seed=3)
    with torch.no_grad():
        fp, q = model(x), quantized(x)
    assert agreement(q, fp) >= 0.9
    assert (q - fp).abs().max() < 0.1 * fp.abs().max()
    # the quantized state loads into a fresh wrap of the family (what a checkpoint relies on)
    fresh = wrap_model(tiny_net(seed=1), Placement(w_bits=8, a_bits=8, softmax_quantizer=config.softmax_quantizer,
                                                   post_ln_per_channel=method == "repq"))
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), q)


def test_a_registered_family_without_rotation_goes_through_the_fast_preset_with_its_reason(tiny_family):
    with pytest.raises(IsvitError, match=r"rotation supports ViT/DeiT.* models, not TinyNet \(the test family has none\)"):
        rotate_model(tiny_net())
    config = isvit.IsvitConfig.from_preset(preset="fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=4)
    with pytest.warns(UserWarning, match="the test family has none"):
        quantized = isvit.quantize(tiny_net(), random_images(8, 32, seed=4), config, progress=False)
    with torch.no_grad():
        assert torch.isfinite(quantized(random_images(4, 32, seed=5))).all()


def test_a_registered_family_checks_before_any_change(tiny_family):
    model = tiny_net()
    model.blocks[1].norm = RmsNorm(16)
    with pytest.raises(IsvitError, match="blocks.1.norm is a RmsNorm"):
        wrap_model(model, Placement(w_bits=8, a_bits=8))
    assert not any(isinstance(m, (Quantizer, QuantLinear, QuantConv2d)) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Every family's checks run before any module is swapped
# ---------------------------------------------------------------------------------------------

def test_a_swin_with_an_unsupported_norm_is_refused_and_left_unmodified():
    model = small_swin(norm_layer=RmsNorm)
    before = {name: type(m) for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    message = "layers.0.blocks.0.norm1 is a RmsNorm; isvit needs LayerNorm there"
    with pytest.raises(IsvitError, match=message):
        check_supported(model)
    with pytest.raises(IsvitError, match=message):
        wrap_model(model, Placement(w_bits=4, a_bits=4))
    assert {name: type(m) for name, m in model.named_modules()} == before  # the patch embedding too
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # refused before any other work: the (empty) calibration data is not even looked at
    with pytest.raises(IsvitError, match=message):
        isvit.quantize(model, [], isvit.MinmaxConfig(), progress=False)
