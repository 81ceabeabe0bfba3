"""The pipeline's contract beyond the methods' stages: bias correction, mixed bit-widths, the
forms calibration data may take, copies and devices."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import isvit
from isvit.checkpoint import load_quantized, quantized_layers, save_quantized
from isvit.config import MinmaxConfig
from isvit.modules import QuantLinear

from conftest import SMALL_VIT, agreement, method_config, random_images, same_state, small_swin, small_vit, state_copy

# ---------------------------------------------------------------------------------------------
# Bias correction
# ---------------------------------------------------------------------------------------------


def linear_inputs_and_outputs(model, x) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
             for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def mean_output_error(linear_io, weight, bias) -> torch.Tensor:
    """Per output channel, the mean over the tokens of ``output - (W x + b)`` (x unquantized, W float)."""
    x, y = linear_io
    return (y - F.linear(x, weight, bias)).reshape(-1, y.shape[-1]).double().mean(dim=0)


@pytest.mark.parametrize("make, method", [(small_vit, "minmax"), (small_vit, "repq"), (small_swin, "repq")])
def test_bias_correction_removes_each_linears_mean_output_error(make, method):
    """On the calibration images, every quantized Linear's mean output error (to the float product
    of its own inputs and its bias before correction) is gone: measured 1e-10..4e-8 where it was
    5e-4..4e-2 without correction. Nothing but the biases changes."""
    x = random_images(16)
    config = method_config(method=method, w_bits=4, a_bits=4, calib_size=16)
    corrected = isvit.quantize(make(), x, config, progress=False)
    plain = isvit.quantize(make(), x, dataclasses.replace(config, bias_correction=False), progress=False)
    io_corrected, io_plain = linear_inputs_and_outputs(corrected, x), linear_inputs_and_outputs(plain, x)
    assert len(io_corrected) >= 9
    a, b = state_copy(corrected), state_copy(plain)
    assert a.keys() == b.keys() and {k for k in a if not torch.equal(a[k], b[k])} == {f"{n}.bias" for n in io_corrected}
    plain_layers = dict(plain.named_modules())
    for name, io in io_corrected.items():
        layer = plain_layers[name]
        before = mean_output_error(io_plain[name], layer.weight, layer.bias).abs().max()
        after = mean_output_error(io, layer.weight, layer.bias).abs().max()
        assert before > 0.01 * io[1].abs().mean(), name  # there was an error to remove
        assert after <= 1e-4 * before, (name, after, before)


def test_no_bias_correction_leaves_every_bias_as_it_was():
    model = small_vit()
    qmodel = isvit.quantize(model, random_images(16), MinmaxConfig(w_bits=4, a_bits=4,
                                                                  bias_correction=False, calib_size=16), progress=False)
    biases = {name: m.bias for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(biases) == 9
    for name, layer in qmodel.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.bias, biases[name]), name


# ---------------------------------------------------------------------------------------------
# Mixed bit-widths
# ---------------------------------------------------------------------------------------------

def distinct_per_row(values: torch.Tensor) -> list[int]:
    return [row.unique().numel() for row in values.reshape(values.shape[0], -1)]


@pytest.mark.parametrize("method", ["minmax", "isvit"])
@pytest.mark.parametrize("w_bits, a_bits", [(4, 8), (8, 4)])
def test_mixed_bit_widths_quantize_weights_and_activations_at_their_own_bits(tmp_path, method, w_bits, a_bits):
    config = method_config(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=16, **({"iters": 1, "batch_size": 8} if method == "isvit" else {}))
    qmodel = isvit.quantize(small_vit(), random_images(16), config, progress=False)
    assert {q.bits for _, q in isvit.quantizers(qmodel, "weight")} == {w_bits}
    assert {q.bits for _, q in isvit.quantizers(qmodel, "activation")} == {a_bits}
    # the grids hold that many values: a weight row of 192 takes at most 2^w of them (more than 16
    # at 8 bits), q (before q @ k^T, one grid per tensor) at most 2^a
    for name, layer in quantized_layers(qmodel):
        counts = distinct_per_row(layer.weight_quantizer.codes(layer.weight))
        assert max(counts) <= 2 ** w_bits and (max(counts) > 16) == (w_bits == 8), name
    seen = []
    hook = qmodel.blocks[1].attn.qk.a_quantizer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        logits = qmodel(random_images(8, seed=2))
    hook.remove()
    assert (seen[0].unique().numel() > 16) == (a_bits == 8) and seen[0].unique().numel() <= 2 ** a_bits
    # and the checkpoint keeps them apart
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name=SMALL_VIT[0], config=config, data_config={}, model_args=SMALL_VIT[1])
    rebuilt, info = load_quantized(path)
    assert (info["config"].w_bits, info["config"].a_bits) == (w_bits, a_bits)
    assert {q.bits for _, q in isvit.quantizers(rebuilt, "weight")} == {w_bits}
    assert {q.bits for _, q in isvit.quantizers(rebuilt, "activation")} == {a_bits}
    with torch.no_grad():
        assert torch.equal(rebuilt(random_images(8, seed=2)), logits)


# ---------------------------------------------------------------------------------------------
# Calibration data: a tensor, a DataLoader, a list or any iterable of batches
# ---------------------------------------------------------------------------------------------

MINMAX = MinmaxConfig(w_bits=4, a_bits=4, calib_size=12)


def quantized_state(calib) -> dict:
    return state_copy(isvit.quantize(small_vit(), calib, MINMAX, progress=False))


def test_quantize_takes_a_dataloader_a_list_or_an_endless_iterable_of_batches():
    x = random_images(20)
    reference = quantized_state(x[:12])
    assert not same_state(reference, quantized_state(x[8:20]))  # the images chosen matter
    # (images, labels) batches of 5: 15 images come, the first 12 are used
    assert same_state(quantized_state(DataLoader(TensorDataset(x, torch.arange(20)), batch_size=5)), reference)
    assert same_state(quantized_state([x[:5], x[5:10], x[10:]]), reference)
    # an endless stream is read only as far as needed
    endless = itertools.chain([x[:7]], itertools.repeat(x[7:12]))
    assert same_state(quantized_state(endless), reference)


@pytest.mark.parametrize("calib, message", [
    ([], "the calibration data is empty"),
    (["images.png"], "calibration batches must be image tensors, got str"),
    ([(["not", "a", "tensor"], torch.zeros(2))], "calibration batches must be image tensors, got list"),
    (torch.zeros(4, 64, 64), r"calibration images must be a \(N, C, H, W\) tensor, got shape \(4, 64, 64\)"),
    ([torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 32, 32)],
     r"calibration batches must all have one image shape, got \(3, 64, 64\) and \(3, 32, 32\)"),
])
def test_bad_calibration_data_is_one_sentence(calib, message):
    with pytest.raises(isvit.IsvitError, match=message):
        isvit.quantize(small_vit(), calib, MINMAX, progress=False)


# ---------------------------------------------------------------------------------------------
# Copies and devices
# ---------------------------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_in_place_on_a_device(device):
    x = random_images(12)
    copied = isvit.quantize(small_vit(), x, MINMAX, progress=False)
    model = small_vit()
    untouched = state_copy(model)
    assert isvit.quantize(model, x, MINMAX, progress=False) is not model and same_state(state_copy(model), untouched)
    qmodel = isvit.quantize(model, x, MINMAX, device=device, inplace=True, progress=False)
    assert qmodel is model and len(isvit.quantizers(model)) == len(isvit.quantizers(copied))
    assert {t.device.type for t in qmodel.state_dict().values()} == {device}
    with torch.no_grad():
        got, expected = qmodel(x.to(device)).cpu(), copied(x)
    if device == "cpu":
        assert torch.equal(got, expected)
    else:  # other kernels, other rounding: the same model up to a few grid steps
        assert agreement(got, expected) >= 0.9
