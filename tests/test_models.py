"""Building models and reading weights: an architecture isvit cannot quantize is refused before any
weights are read; safetensors and torch.save'd state dicts load, also nested as training checkpoints are."""

import pytest
import torch
from safetensors.torch import save_file

import isvit
from isvit.errors import IsvitError
from isvit.models import create_model, read_state_dict

from conftest import TINY_RESNET, TINY_VIT, same_state, small_vit, state_copy


def test_an_unquantizable_model_is_refused_before_any_download(timm_builds):
    with pytest.raises(IsvitError, match="not ResNet"):
        create_model("resnet18", quantizable=True)
    assert timm_builds == [False]


def test_an_unquantizable_model_is_refused_before_its_weights_file_is_read(tmp_path, timm_builds):
    with pytest.raises(IsvitError, match="not ResNet"):
        create_model(TINY_RESNET, tmp_path / "missing.safetensors", quantizable=True)


def test_any_timm_model_timm_builds_when_it_is_not_to_be_quantized(tiny_weights, timm_builds):
    model = create_model(TINY_RESNET, tiny_weights(TINY_RESNET))
    assert type(model).__name__ == "ResNet" and not model.training


def test_a_quantizable_model_is_built_once_with_a_weights_file(tiny_weights, timm_builds):
    weights = tiny_weights(TINY_VIT)
    timm_builds.clear()
    model = create_model(TINY_VIT, weights, quantizable=True)
    assert type(model).__name__ == "VisionTransformer" and timm_builds == [False]


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
    lambda sd: {"model_state_dict": sd, "args": "--lr 0.1"},
    lambda sd: {"checkpoint": 1, "state_dict": {"model": sd}},
], ids=["plain", "state_dict", "model", "model_state_dict", "state_dict-model"])
def test_a_pth_file_loads_the_state_dict_it_holds(tmp_path, wrap):
    weights = state_copy(small_vit(seed=0))
    path = tmp_path / "w.pth"
    torch.save(wrap(weights), path)
    model = small_vit(seed=1)
    assert not same_state(state_copy(model), weights)
    isvit.load_weights(model, path)
    assert same_state(state_copy(model), weights)


def test_a_safetensors_file_loads_strictly(tmp_path):
    weights = state_copy(small_vit(seed=0))
    save_file(weights, str(tmp_path / "w.safetensors"))
    model = small_vit(seed=1)
    isvit.load_weights(model, tmp_path / "w.safetensors")
    assert same_state(state_copy(model), weights)


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "does not hold a state dict of tensors"),
    ({"model": {"blocks.0.norm1.weight": "a string"}}, "does not hold a state dict of tensors"),
])
def test_a_pth_file_without_a_state_dict_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(isvit.IsvitError, match=message) as error:
        read_state_dict(path)
    assert str(path) in str(error.value)


def test_a_corrupt_pth_file_is_one_sentence(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a pickle")
    with pytest.raises(isvit.IsvitError, match=f"cannot read weights file {path}"):
        read_state_dict(path)
