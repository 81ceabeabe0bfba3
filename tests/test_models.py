"""Building models: an architecture isvit cannot quantize is refused before any weights are read."""

import pytest

from isvit.errors import IsvitError
from isvit.models import create_model

from conftest import TINY_RESNET, TINY_VIT


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
