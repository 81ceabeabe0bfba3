"""OpenVINO as the second runtime of an exported file (``load_onnx(path, runtime="openvino")``):
small ViT and Swin models at W8/A8 and W4/A4 run by OpenVINO compute what PyTorch computes, the
metadata and the one-sentence errors are onnxruntime's, the inference precision reported is the one
compiled, and ``isvit eval --onnx --runtime openvino`` (the real ViT-Ti: test_export.py, for both runtimes).

Whole-model tolerance as for onnxruntime (see test_export.py's docstring): a quantized network is a
step function, so OpenVINO's float rounding moves a few values across a grid boundary; whole models
must agree on the predicted class and differ from PyTorch by well under the quantization error
(mean |OpenVINO - PyTorch| <= half of mean |PyTorch quantized - fp32|). Everything that compares
logits asks for f32: OpenVINO's default is bf16 on CPUs that have it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import openvino
import pytest
import torch
from onnx import TensorProto, helper

import isvit
from isvit.cli import main
from isvit.errors import IsvitError
from isvit.export import folded_tables
from isvit.runtime import OpenVinoModel, load_onnx

from conftest import error_of, random_images, torch_threads
from export_examples import BAD_ONNX, data_config, export_settings, export_tiny_fp32, img_size, small_model

pytestmark = pytest.mark.openvino  # scripts/test.sh runs this file in a process of its own (conftest.py)

VERSION = openvino.__version__.split("-")[0]  # the release, as isvit reports it
# OpenVINO's CPU plugin lists BF16 where the CPU has it (AVX-512 BF16 or AMX): its default precision there
CPU_HAS_BF16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")

# ViT and Swin (with padded windows, as in test_export.py) at W8/A8 and W4/A4: the uniform
# post-Softmax grid (minmax), log-sqrt2 (repq) and SULQ after one reconstruction step (isvit).
SETTINGS = [("vit", "minmax", 8), ("vit", "isvit", 4), ("swin", "repq", 8), ("swin", "isvit", 4)]
IDS = [f"{a}-{m}-w{b}" for a, m, b in SETTINGS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module's PyTorch work on one thread, as its runtimes' (threads=1); restored after."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each setting quantized and exported once: {setting: (model, config, path, products)}."""
    return export_settings(SETTINGS, tmp_path_factory.mktemp("openvino"))


@pytest.fixture(scope="module")
def vit_w4a4(exported):
    """The small W4/A4 ViT (isvit) and its file: what the error and CLI tests read."""
    model, _, path, _ = exported[("vit", "isvit", 4)]
    return model, path


# ---------------------------------------------------------------------------------------------
# Whole small models run by OpenVINO
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_openvino_computes_what_pytorch_computes(exported, setting):
    model, _, path, _ = exported[setting]
    arch = setting[0]
    ov_model, info = load_onnx(path, threads=1, runtime="openvino", precision="f32")
    assert isinstance(ov_model, OpenVinoModel)
    assert (ov_model.runtime, ov_model.version, ov_model.precision) == ("openvino", VERSION, "f32")
    # no second, dynamic quantization of the file's quantized activations (OpenVINO's default on
    # CPUs with VNNI or AMX: there it took swin-repq-w8 to 1.1x the quantization error from PyTorch)
    assert ov_model.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0
    x = random_images(16, img_size(arch), seed=3)
    with torch.no_grad(), folded_tables(model):  # what the file computes: the post-Softmax tables folded
        expected, fp = model(x), small_model(arch)(x)
        got = ov_model(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (16, 10)
    # Measured (AMD EPYC, AVX2, OpenVINO 2026.4.1): 16 / 16 equal predictions everywhere, mean
    # |OpenVINO - PyTorch| 1e-5 (vit-minmax-w8), 5e-7 (vit-isvit-w4), 0.16 (swin-repq-w8), 7e-7
    # (swin-isvit-w4) of the quantization error; on an Intel Xeon with AVX-512 VNNI and AMX the same
    # without dynamic quantization, 1.1 (vit-minmax-w8) and 0.6 (swin-repq-w8) with it.
    assert (got.argmax(1) == expected.argmax(1)).sum() >= 15
    assert (got - expected).abs().mean() <= 0.5 * (expected - fp).abs().mean()
    # the batch is dynamic, and each call's logits are its own, not the buffer the next call writes into
    kept = got.clone()
    assert ov_model(x[:1]).shape == (1, 10) and ov_model(x[:3]).shape == (3, 10)
    ov_model(x.flip(0))
    assert torch.equal(got, kept)
    # the metadata is read and checked as onnxruntime reads it
    assert info == load_onnx(path, threads=1)[1]


def test_default_precision_is_f32_where_post_softmax_codes_are_float_arithmetic(exported, tmp_path):
    """With no precision asked for, a file whose post-Softmax codes are float arithmetic (SULQ below
    8 bits: Log and Exp on every attention map, which OpenVINO runs at half the speed in bf16) gets
    f32; a file whose products are all it quantizes (W8/A8) and a full-precision file get OpenVINO's
    own default, bf16 where the CPU has it (docs/onnx.md#openvino)."""
    default = "bf16" if CPU_HAS_BF16 else "f32"
    for setting, expected in ((("vit", "isvit", 4), "f32"), (("vit", "minmax", 8), default)):
        path = exported[setting][2]
        has_log = any(n.op_type == "Log" for n in onnx.load(str(path)).graph.node)
        assert has_log == (setting[2] < 8)
        ov_model, _ = load_onnx(path, threads=1, runtime="openvino")
        assert ov_model.precision == expected == ov_model.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    fp32_path = tmp_path / "fp32.onnx"
    export_tiny_fp32(fp32_path)
    fp32_model, _ = load_onnx(fp32_path, threads=1, runtime="openvino")
    assert fp32_model.precision == default


def test_the_precision_reported_is_the_one_compiled(vit_w4a4):
    """Where the CPU has no bf16, OpenVINO compiles f32 when bf16 is asked for, silently: isvit reads
    back what was compiled rather than repeating what was asked."""
    _, path = vit_w4a4
    ov_model, _ = load_onnx(path, threads=1, runtime="openvino", precision="bf16")
    assert ov_model.precision == ov_model.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    assert ov_model.precision == ("bf16" if CPU_HAS_BF16 else "f32")
    x = random_images(4, img_size("vit"), seed=3)
    got = ov_model(x)
    assert got.shape == (4, 10) and torch.isfinite(got).all()
    if not CPU_HAS_BF16:  # the same f32 model as precision="f32"
        f32_model, _ = load_onnx(path, threads=1, runtime="openvino", precision="f32")
        assert torch.equal(got, f32_model(x))


def test_evaluate_takes_the_openvino_model(vit_w4a4, image_folder):
    model, path = vit_w4a4
    ov_model, info = load_onnx(path, threads=1, runtime="openvino", precision="f32")
    dataset = isvit.ImageFolderDataset(image_folder, isvit.build_transform(info["data_config"]))
    loader = isvit.make_loader(dataset, batch_size=3, num_workers=0)
    got = isvit.evaluate(ov_model, loader, device="cpu", progress=False)
    expected = isvit.evaluate(model, loader, device="cpu", progress=False)
    assert got["images"] == 8 and (got["top1"], got["top5"]) == (expected["top1"], expected["top5"])


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence, in onnxruntime's words
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(BAD_ONNX))
def test_bad_onnx_file_is_the_same_sentence_as_onnxruntime(vit_w4a4, image_folder, tmp_path, capsys, case):
    make, message = BAD_ONNX[case]
    path = make(vit_w4a4[1], tmp_path / "bad.onnx")
    with pytest.raises(IsvitError) as error:
        load_onnx(path, threads=1, runtime="openvino")
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)
    out = tmp_path / "eval.json"
    err = error_of(capsys, ["eval", "--onnx", str(path), "--data", str(image_folder), "--runtime", "openvino",
                            "--json", str(out), "--quiet"])
    assert message in err and not out.exists()


def isvit_file_with(node: onnx.NodeProto, output: str, source: Path, target: Path) -> Path:
    """A one-node model (input ``images``, output ``output``) with the metadata of ``source``."""
    graph = helper.make_graph([node], "one_node", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("isvit.test", 1)])
    helper.set_model_props(model, {p.key: p.value for p in onnx.load(str(source)).metadata_props})
    onnx.save_model(model, str(target))
    return target


@pytest.mark.parametrize("node, output, message", [
    (helper.make_node("Relu", ["images"], ["y"]), "y", "does not have the input 'images' and output 'logits'"),
    (helper.make_node("NoSuchOp", ["images"], ["logits"], domain="isvit.test"), "logits",
     "OpenVINO cannot read {path} (No conversion rule found for operations: isvit.test.NoSuchOp)"),
], ids=["other names", "unknown op"])
def test_an_isvit_file_openvino_cannot_run_is_one_sentence(vit_w4a4, tmp_path, node, output, message):
    path = isvit_file_with(node, output, vit_w4a4[1], tmp_path / "m.onnx")
    with pytest.raises(IsvitError) as error:
        load_onnx(path, runtime="openvino")
    assert message.format(path=path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("missing", ["openvino", "onnx"])
def test_openvino_not_installed_says_how_to_install_it(vit_w4a4, image_folder, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(IsvitError, match=rf"needs the {missing} package, which is not installed: "
                                         r"pip install 'isvit\[openvino\]'$"):
        load_onnx(vit_w4a4[1], runtime="openvino")
    err = error_of(capsys, ["eval", "--onnx", str(vit_w4a4[1]), "--data", str(image_folder), "--runtime", "openvino"])
    assert "pip install 'isvit[openvino]'" in err


@pytest.mark.parametrize("options, message", [
    ({"runtime": "tensorrt"}, "unknown runtime 'tensorrt': the exported file runs with onnxruntime or openvino"),
    ({"precision": "f32"}, "precision='f32' is OpenVINO's inference precision: give it with runtime='openvino'"),
    ({"runtime": "openvino", "precision": "f16"}, "unknown inference precision 'f16': OpenVINO takes f32 or bf16"),
    ({"runtime": "openvino", "optimize": False}, "optimize=False turns off onnxruntime's graph optimizations"),
])
def test_options_of_the_other_runtime_are_refused(vit_w4a4, options, message):
    with pytest.raises(IsvitError) as error:
        load_onnx(vit_w4a4[1], **options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# The command line: isvit eval --onnx FILE --runtime openvino
# ---------------------------------------------------------------------------------------------

def test_cli_eval_onnx_with_openvino(vit_w4a4, image_folder, tmp_path, capsys):
    model, path = vit_w4a4
    out = tmp_path / "eval.json"
    assert main(["eval", "--onnx", str(path), "--data", str(image_folder), "--runtime", "openvino",
                 "--inference-precision", "f32", "--batch-size", "3", "--limit", "7", "--threads", "1",
                 "--workers", "0", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "isvit" in printed and "4/4" in printed and f"(openvino {VERSION}, inference precision f32)" in printed
    result = json.loads(out.read_text())
    assert result["runtime"] == "openvino" and result["openvino"] == VERSION and result["inference_precision"] == "f32"
    assert "onnxruntime" not in result and result["onnx"] == str(path) and result["device"] == "cpu"
    assert result["images"] == 7 and result["method"] == "isvit" and result["w_bits"] == 4

    # The same images through the PyTorch model: the same top-1
    dataset = isvit.ImageFolderDataset(image_folder, isvit.build_transform(data_config("vit")), limit=7)
    expected = isvit.evaluate(model, isvit.make_loader(dataset, batch_size=3, num_workers=0), progress=False)
    assert (result["top1"], result["top5"]) == (expected["top1"], expected["top5"])


def test_cli_eval_onnx_reports_the_precision_compiled(vit_w4a4, image_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--onnx", str(vit_w4a4[1]), "--data", str(image_folder), "--runtime", "openvino",
                 "--inference-precision", "bf16", "--limit", "2", "--threads", "1", "--workers", "0",
                 "--json", str(out), "--quiet"]) == 0
    compiled = "bf16" if CPU_HAS_BF16 else "f32"
    assert f"(openvino {VERSION}, inference precision {compiled})" in capsys.readouterr().out
    assert json.loads(out.read_text())["inference_precision"] == compiled


def test_cli_eval_onnx_names_onnxruntime_by_default(vit_w4a4, image_folder, tmp_path, capsys):
    import onnxruntime

    out = tmp_path / "eval.json"
    assert main(["eval", "--onnx", str(vit_w4a4[1]), "--data", str(image_folder), "--limit", "2", "--threads", "1",
                 "--workers", "0", "--json", str(out), "--quiet"]) == 0
    assert f"(onnxruntime {onnxruntime.__version__})" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["runtime"] == "onnxruntime" and result["onnxruntime"] == onnxruntime.__version__
    assert "inference_precision" not in result and "openvino" not in result


@pytest.mark.parametrize("argv, message", [
    (["--onnx", "{onnx}", "--inference-precision", "bf16"],
     "--inference-precision is OpenVINO's inference precision: give it with --runtime openvino"),
    (["--onnx", "{onnx}", "--runtime", "onnxruntime", "--inference-precision", "f32"],
     "--inference-precision is OpenVINO's inference precision: give it with --runtime openvino"),
    (["--model", "test_vit", "--runtime", "openvino"], "--runtime applies to an exported ONNX model only: give it with --onnx"),
    (["--quantized", "{onnx}", "--runtime", "onnxruntime"], "--runtime applies to an exported ONNX model only"),
    (["--model", "test_vit", "--inference-precision", "f32"], "--inference-precision applies to an exported ONNX model only"),
    (["--onnx", "{onnx}", "--runtime", "openvino", "--device", "meta"], "runs on the CPU with openvino, not on meta"),
])
def test_cli_refusals_are_one_sentence_and_write_nothing(vit_w4a4, image_folder, tmp_path, capsys, timm_builds,
                                                         argv, message):
    out = tmp_path / "eval.json"
    err = error_of(capsys, ["eval", *(a.format(onnx=vit_w4a4[1]) for a in argv), "--data", str(image_folder),
                            "--json", str(out), "--quiet"])
    assert message in err and list(tmp_path.iterdir()) == [] and timm_builds == []


# The real ViT-Ti in OpenVINO: test_export.py's test_real_vit_in_each_runtime_matches_pytorch and
# test_real_vit_w4_file_is_small_and_every_product_but_the_image_s_is_integer, for both runtimes at once.
