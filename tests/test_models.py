"""Weights files: safetensors and torch.save'd state dicts, also nested as training checkpoints are."""

import pytest
import torch
from safetensors.torch import save_file

import isvit
from isvit.models import read_state_dict

from conftest import same_state, small_vit, state_copy


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
