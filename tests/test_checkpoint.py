"""Integer checkpoints: packing, exact rebuild, file size, one-sentence errors, CLI round trip."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import isvit
from isvit.checkpoint import (
    CODES_SUFFIX,
    FORMAT,
    atomic_write,
    float32_size,
    load_quantized,
    pack_codes,
    packed_length,
    quantized_layers,
    save_quantized,
    unpack_codes,
)
from isvit.cli import main
from isvit.errors import IsvitError

from conftest import CALIB_DIR as CALIB
from conftest import SMALL_SWIN, SMALL_VIT, method_config, random_images, small_swin, small_vit, truncated, umask
from conftest import VAL_DIR as VAL
from conftest import VIT_TINY_WEIGHTS as WEIGHTS

ARCHITECTURES = {"vit": SMALL_VIT, "swin": SMALL_SWIN}


def small_model(arch: str) -> torch.nn.Module:
    return small_vit() if arch == "vit" else small_swin()


def quantized(arch: str, method: str, bits: int, **fields):
    config = method_config(method=method, w_bits=bits, a_bits=bits, calib_size=16, iters=2 if method == "isvit" else None, batch_size=8 if method == "isvit" else None, **fields)
    return isvit.quantize(small_model(arch), random_images(16, seed=1), config, progress=False), config


def save(model, config, path, arch="vit"):
    name, args = ARCHITECTURES[arch]
    save_quantized(model, path, model_name=name, config=config, data_config={"input_size": [3, 64, 64]}, model_args=args)
    return path


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4, 3, 3, 3), (2, 6)])
def test_pack_unpack_round_trip(bits, shape):
    codes = torch.randint(0, 2 ** bits, shape, generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    numel = math.prod(shape)
    assert packed.numel() == packed_length(numel, bits) == (math.ceil(numel / 2) if bits <= 4 else numel)
    assert torch.equal(unpack_codes(packed, bits, shape), codes.to(torch.uint8))


def test_nibble_order_is_low_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 3, 15, 9]), bits=4)
    assert packed.tolist() == [0x21, 0xF3, 0x09]


def test_pack_refuses_codes_outside_the_grid():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0, 8]), bits=3)


def test_unpack_refuses_a_wrong_length():
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), bits=4, shape=(7,))


# ---------------------------------------------------------------------------------------------
# Exact rebuild
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["minmax", "repq", "isvit"])
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_rebuilt_model_gives_bit_identical_logits(tmp_path, arch, bits, method):
    model, config = quantized(arch, method, bits)
    path = save(model, config, tmp_path / "q.safetensors", arch)
    rebuilt, info = load_quantized(path)
    assert info["config"] == isvit.config_from_dict(config.to_dict()) and info["model"] == ARCHITECTURES[arch][0]
    x = random_images(4, seed=2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    for (name, layer), (_, original) in zip(quantized_layers(rebuilt), quantized_layers(model)):
        q = layer.weight_quantizer
        assert torch.equal(q.codes(layer.weight), original.weight_quantizer.codes(original.weight)), name


@pytest.mark.parametrize("fields", [{"stage1": False}, {"fold": False}], ids=["no-stage1", "no-fold"])
def test_isvit_ablations_are_rebuilt_exactly(tmp_path, fields):
    model, config = quantized("vit", "isvit", 4, **fields)
    rebuilt, info = load_quantized(save(model, config, tmp_path / "q.safetensors"))
    assert info["config"] == isvit.config_from_dict(config.to_dict()) and info["config"].stage1 == config.stage1
    assert info["config"].fold == config.fold
    # without the fold the post-LayerNorm grids were placed per tensor, and are rebuilt so
    assert all(block.attn.qkv.input_quantizer.per_channel == config.fold for block in rebuilt.blocks)
    x = random_images(4, seed=2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_load_quantized_puts_the_model_on_the_device_asked_for(tmp_path, device):
    model, config = quantized("vit", "minmax", 4)
    rebuilt, _ = load_quantized(save(model, config, tmp_path / "q.safetensors"), device=device)
    assert {t.device.type for t in rebuilt.state_dict().values()} == {device}
    assert {q.scale.device.type for _, q in isvit.quantizers(rebuilt)} == {device}


def vit_with_an_outlier_channel() -> torch.nn.Module:
    """The small ViT with channel 3 of block 0's fc2 input near 60 on every token (the rest ~1)."""
    model = small_vit()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias[3] = 60.0
    return model


def test_a_split_grid_is_placed_on_linear_inputs_and_rebuilt_exactly(tmp_path):
    config = isvit.MinmaxConfig(w_bits=4, a_bits=4, calib_size=16, outlier_ratio=8.0)
    model = isvit.quantize(vit_with_an_outlier_channel(), random_images(16, seed=1), config, progress=False)
    fc2_input = model.blocks[0].mlp.fc2.input_quantizer
    assert fc2_input.scale.shape == (fc2_input.scale.numel(),) and fc2_input.scale.unique().numel() == 2
    top = (fc2_input.levels - 1 - fc2_input.zero_point) * fc2_input.scale  # each channel's largest value
    assert top[3] > 55 and top[0] < 10  # channel 3 keeps its ~60, the others a fine grid
    for q in (model.blocks[0].attn.qk.a_quantizer, model.blocks[0].attn.av.b_quantizer):
        assert q.outlier_ratio == 0 and q.scale.numel() == 1  # matrix-product operands keep one grid
    assert model.blocks[0].attn.qkv.input_quantizer.outlier_ratio == 0  # post-LayerNorm: the fold's business
    assert model.blocks[0].mlp.fc1.input_quantizer.outlier_ratio == 0
    assert model.blocks[0].attn.proj.input_quantizer.outlier_ratio == 8.0
    path = save(model, config, tmp_path / "q.safetensors")
    rebuilt, info = load_quantized(path)
    assert info["config"].outlier_ratio == 8.0
    assert torch.equal(rebuilt.blocks[0].mlp.fc2.input_quantizer.scale, fc2_input.scale)
    x = random_images(4, seed=2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_file_holds_codes_not_float_weights(tmp_path):
    model, config = quantized("vit", "repq", 4)
    path = save(model, config, tmp_path / "q.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        qkv_codes = f.get_tensor("blocks.0.attn.qkv" + CODES_SUFFIX)
        zero_point = f.get_tensor("blocks.0.attn.qkv.weight_quantizer.zero_point")
    assert metadata["format"] == FORMAT and metadata["model"] == "vit_tiny_patch16_224"
    layers = json.loads(metadata["quantized_weights"])
    assert layers["blocks.0.attn.qkv"] == {"bits": 4, "shape": [576, 192]}
    assert qkv_codes.dtype == torch.uint8 and qkv_codes.numel() == 576 * 192 // 2
    assert zero_point.dtype == torch.int32 and zero_point.numel() == 576
    for name in layers:
        assert f"{name}.weight" not in keys and f"{name}{CODES_SUFFIX}" in keys
    # The post-LayerNorm quantizer of qkv was folded to per tensor, and the folded LayerNorm is kept.
    assert "blocks.0.attn.qkv.input_quantizer.scale" in keys and "blocks.0.norm1.weight" in keys
    assert json.loads(metadata["config"])["method"] == "repq"


@pytest.mark.parametrize("bits, smaller", [(4, 6.5), (8, 3.5)])
def test_file_is_much_smaller_than_float32(tmp_path, bits, smaller):
    model, config = quantized("vit", "minmax", bits)
    path = save(model, config, tmp_path / "q.safetensors")
    assert os.path.getsize(path) * smaller < float32_size(small_model("vit"))


def test_save_refuses_a_model_with_a_quantizer_switched_off(tmp_path):
    model, config = quantized("vit", "minmax", 4)
    isvit.set_quantizers(model, False, "activation")
    with pytest.raises(IsvitError, match="switched off"):
        save(model, config, tmp_path / "q.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    model, config = quantized("vit", "minmax", 4)
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(model, config, tmp_path / "q.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_creates_files_with_the_umask_permissions(tmp_path, mask, mode):
    path = tmp_path / "out" / "result.json"
    with umask(mask):
        atomic_write(path, lambda tmp: Path(tmp).write_text("{}"))
    assert path.read_text() == "{}" and path.stat().st_mode & 0o777 == mode
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left


def test_a_saved_checkpoint_has_the_umask_permissions(tmp_path):
    model, config = quantized("vit", "minmax", 4)
    with umask(0o027):
        save(model, config, tmp_path / "q.safetensors")
    assert (tmp_path / "q.safetensors").stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------------------------------------
# Bad files: one sentence each, from the API and from the CLI
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """A small quantized ViT and Swin saved once for the error tests."""
    folder = tmp_path_factory.mktemp("saved")
    paths = {}
    for arch in ("vit", "swin"):
        model, config = quantized(arch, "minmax", 4)
        paths[arch] = save(model, config, folder / f"{arch}.safetensors", arch)
    return paths


def rewrite(source, target, **metadata_changes):
    """Copy a checkpoint with some metadata entries replaced."""
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = dict(f.metadata())
    metadata.update(metadata_changes)
    save_file(tensors, str(target), metadata=metadata)
    return target


def random_bytes(source, target):
    target.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    return target


def short_codes(source, target):
    """A well-formed safetensors file whose codes of one layer lost their last byte."""
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    key = "blocks.1.mlp.fc2" + CODES_SUFFIX
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(target), metadata=metadata)
    return target


def plain_weights(source, target):
    save_file(small_model("vit").state_dict(), str(target))
    return target


BAD_FILES = {
    "missing": (lambda saved, t: t, "does not exist"),
    "truncated": (lambda saved, t: truncated(saved["vit"], t), "corrupt or truncated"),
    "random bytes": (lambda saved, t: random_bytes(saved["vit"], t), "corrupt or truncated"),
    "plain weights": (lambda saved, t: plain_weights(saved["vit"], t), "not an isvit quantized model file"),
    "unknown version": (lambda saved, t: rewrite(saved["vit"], t, format="isvit-int-v99"),
                        "has format 'isvit-int-v99', which this isvit cannot read"),
    "fake-quant format": (lambda saved, t: rewrite(saved["vit"], t, format="isvit-fakequant-v1"),
                          "has format 'isvit-fakequant-v1', which this isvit cannot read"),
    "wider vit": (lambda saved, t: rewrite(saved["vit"], t, model="vit_small_patch16_224"),
                  "does not match the vit_small_patch16_224 architecture: patch_embed.proj.weight has shape"),
    "swin as deit": (lambda saved, t: rewrite(saved["swin"], t, model="deit_tiny_patch16_224", model_args="{}"),
                     "does not match the deit_tiny_patch16_224 architecture: "),
    "short codes": (lambda saved, t: short_codes(saved["vit"], t), "has damaged codes for blocks.1.mlp.fc2"),
    "unknown architecture": (lambda saved, t: rewrite(saved["vit"], t, model="vit_gigantic_nonsense"),
                             "names the architecture 'vit_gigantic_nonsense', which timm does not know"),
    "damaged config": (lambda saved, t: rewrite(saved["vit"], t, config="{not json"), "no valid 'config' entry"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_clear_sentence(tmp_path, capsys, saved_files, case):
    make, message = BAD_FILES[case]
    path = make(saved_files, tmp_path / "bad.safetensors")
    with pytest.raises(IsvitError) as error:
        load_quantized(path)
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)

    assert main(["eval", "--quantized", str(path), "--data", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("isvit: error: ") and message in err and "\n" not in err and "Traceback" not in err, err


def test_eval_quantized_refuses_weights(tmp_path, capsys, saved_files):
    argv = ["eval", "--quantized", str(saved_files["vit"]), "--weights", str(saved_files["vit"]), "--data", str(tmp_path)]
    assert main(argv) == 2
    assert "--weights" in capsys.readouterr().err


def test_eval_needs_model_quantized_or_onnx(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "one of the arguments --model --quantized --onnx is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real ViT-Ti through the CLI: quantize --save, then eval --quantized from the file alone
# ---------------------------------------------------------------------------------------------

@pytest.mark.real
def test_cli_round_trip_reproduces_top1_on_the_real_vit(shared_dir, tmp_path, capsys):
    saved, quantize_json, eval_json = tmp_path / "w4a4.safetensors", tmp_path / "q.json", tmp_path / "e.json"
    common = ["--data", str(VAL), "--limit", "100", "--batch-size", "50", "--quiet"]
    assert main(["quantize", "--model", "vit_tiny_patch16_224", "--weights", str(WEIGHTS), "--calib",
                 str(CALIB), "--method", "repq", "--w-bits", "4", "--a-bits", "4", "--calib-size", "32", "--no-fp",
                 "--save", str(saved), "--json", str(quantize_json), *common]) == 0
    printed = capsys.readouterr().out
    quantize_result = json.loads(quantize_json.read_text())
    size, fp32 = quantize_result["saved_bytes"], quantize_result["fp32_bytes"]
    assert size == os.path.getsize(saved) and abs(fp32 - os.path.getsize(WEIGHTS)) < 100_000
    assert fp32 > 6.5 * size
    assert f"saved {saved}: {size / 1e6:.1f} MB (fp32 weights: {fp32 / 1e6:.1f} MB, {fp32 / size:.1f}x smaller)" in printed

    assert main(["eval", "--quantized", str(saved), "--json", str(eval_json), *common]) == 0
    eval_result = json.loads(eval_json.read_text())
    assert eval_result["top1"] == quantize_result["top1"] and eval_result["top5"] == quantize_result["top5"]
    assert eval_result["images"] == 100 and eval_result["model"] == "vit_tiny_patch16_224"
    assert eval_result["method"] == "repq" and eval_result["w_bits"] == 4 and eval_result["quantized"] == str(saved)
    assert eval_result["data_config"] == quantize_result["data_config"]
