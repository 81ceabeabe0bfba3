"""OpenVINO IR export (isvit.openvino_ir): ``export_openvino`` and ``isvit export --openvino DIR``
write DIR/model.xml and DIR/model.bin and nothing else, atomically; the IR round-trips
(``load_onnx(DIR, runtime="openvino")`` gives the ONNX file's logits on OpenVINO and its metadata);
weights are stored at their bit-width (unsigned codes and an int8 zero point per channel) and
OpenVINO still runs every Linear as an int8 FullyConnected; one-sentence refusals; the real ViT-Ti
at W4/A8 on 200 images.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import openvino
import pytest
import torch

import isvit
from isvit.checkpoint import quantized_layers, save_quantized
from isvit.cli import main
from isvit.errors import IsvitError
from isvit.modules import QuantLinear
from isvit.openvino_ir import export_openvino, write_openvino
from isvit.quantizers import UniformQuantizer
from isvit.runtime import load_onnx

from conftest import error_of, random_images, torch_threads
from export_examples import ARCHITECTURES, TINY, VIT, data_config, export_settings, img_size

pytestmark = pytest.mark.openvino  # scripts/test.sh runs this file in a process of its own (conftest.py)

# The small ViT at W4/A4 (isvit: SULQ, the weights stored as u4), W3/A3 (u3) and W8/A8 (minmax: int8)
SETTINGS = [("vit", "isvit", 4), ("vit", "isvit", 3), ("vit", "minmax", 8)]
IDS = [f"{a}-{m}-w{b}" for a, m, b in SETTINGS]
# The storage type of a weight of b bits: OpenVINO has no u5, and int8 codes from 7 bits on
STORAGE = {1: "u1", 2: "u2", 3: "u3", 4: "u4", 5: "u6", 6: "u6", 7: "i8", 8: "i8"}
WIDTH = {"u1": 1, "u2": 2, "u3": 3, "u4": 4, "u6": 6, "i8": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@dataclass
class Exported:
    model: torch.nn.Module
    config: isvit.config.Config
    onnx: Path  # the ONNX file of export_onnx
    ir: Path  # the IR folder of export_openvino, from the same model
    result: dict  # what export_openvino returned
    counts: dict  # what export_onnx returned


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[tuple, Exported]:
    """Each setting quantized, exported to ONNX and, from the same model, to an IR."""
    folder = tmp_path_factory.mktemp("openvino_ir")
    found = {}
    for setting, (model, config, path, counts) in export_settings(SETTINGS, folder).items():
        arch = setting[0]
        name, args = ARCHITECTURES[arch]
        ir = folder / f"{path.stem}_ir"
        result = export_openvino(model, ir, model_name=name, config=config, data_config=data_config(arch),
                                 model_args=args)
        found[setting] = Exported(model, config, path, ir, result, counts)
    return found


def weight_storage(folder: Path) -> list[tuple[str, int, int]]:
    """(element type, bytes, weights) of the codes of every weight of the IR in ``folder``: the
    constant before a product's ``Multiply <- Convert`` (int8 codes), or before ``Subtract <- Convert``
    (narrow codes and a zero point). Products of two activations have a FakeQuantize there instead."""
    model = openvino.Core().read_model(str(folder / "model.xml"))
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() not in ("MatMul", "Convolution"):
            continue
        scaled = node.input_value(1).get_node()
        if scaled.get_type_name() != "Multiply" or scaled.input_value(0).get_node().get_type_name() != "Convert":
            continue
        convert = scaled.input_value(0).get_node()
        codes = convert.input_value(0).get_node()
        if codes.get_type_name() == "Subtract":
            codes = codes.input_value(0).get_node().input_value(0).get_node()
        assert codes.get_type_name() == "Constant", codes
        found.append((codes.get_element_type().get_type_name(), codes.get_byte_size(),
                      int(np.prod(codes.get_output_shape(0)))))
    return found


def weight_products(model) -> int:
    """How many products read a quantized weight: one per Linear, two where its input has outlier
    channels of their own, one per Conv."""
    count = 0
    for _, layer in quantized_layers(model):
        q = layer.input_quantizer if isinstance(layer, QuantLinear) else None
        outliers = isinstance(q, UniformQuantizer) and q.is_per_channel and q.scale.unique().numel() == 2
        count += 2 if outliers else 1
    return count


def compiled_kernels(ov_model, size: int) -> list[tuple[str, str, str]]:
    """(layerType, runtimePrecision, primitiveType) of each FullyConnected layer OpenVINO compiled."""
    ov_model(torch.zeros(1, 3, size, size))
    found = []
    for op in ov_model.compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        if rt["layerType"].astype(str).startswith("FullyConnected"):
            found.append(tuple(rt[key].astype(str) for key in ("layerType", "runtimePrecision", "primitiveType")))
    return found


# ---------------------------------------------------------------------------------------------
# The real ViT-Ti at W4/A8 (isvit, fast preset, one iteration) on 200 validation images
# ---------------------------------------------------------------------------------------------

# First in the file: its session fixtures decode the images in DataLoader worker processes, which
# are then forked before OpenVINO's CPU plugin is loaded. With the plugin loaded, a worker's exit
# crashed the process (segfault in the SIGCHLD handler that torch's DataLoader installs).

@pytest.mark.real
def test_real_vit_ir_gives_the_onnx_file_s_top1_on_openvino(real_exported, val_batches, tmp_path):
    """The IR of the real W4/A8 ViT-Ti: the ONNX file's predictions on OpenVINO, every Linear an int8
    FullyConnected, weights stored as u4. At f32 the two compute the same (at least 99% of the 200
    predictions equal, the top-1 within one image); at the precision isvit compiles them at
    (OpenVINO's default: bf16 where the CPU has it), whose rounding of the float work between the
    products depends on how OpenVINO fused each graph, within the tolerance of a file against
    PyTorch (top-1 within 1 point, at least 95% equal)."""
    model, config, path = real_exported(4, 8)
    ir = tmp_path / "ir"
    result = export_openvino(model, ir, model_name="vit_tiny_patch16_224", config=config,
                             data_config=isvit.resolve_data_config(model))
    labels = torch.cat([y for _, y in val_batches])
    for precision, agreement, top1_points in (("f32", 0.99, 100.0 / len(labels)), (None, 0.95, 1.0)):
        predictions = {}
        for name, given in (("onnx", path), ("ir", ir)):
            ov_model, _ = load_onnx(given, threads=1, runtime="openvino", precision=precision)
            predictions[name] = torch.cat([ov_model(x) for x, _ in val_batches]).argmax(1)
        top1 = {name: 100.0 * (p == labels).float().mean().item() for name, p in predictions.items()}
        equal = (predictions["ir"] == predictions["onnx"]).float().mean().item()
        assert equal >= agreement and abs(top1["ir"] - top1["onnx"]) <= top1_points, (precision, equal, top1)

    kernels = compiled_kernels(load_onnx(ir, threads=1, runtime="openvino")[0], 224)
    assert len(kernels) >= 12 * 4 + 1 and all("i8" in kernel.lower() for _, _, kernel in kernels), kernels
    stored = weight_storage(ir)
    assert len(stored) == weight_products(model)
    assert sum(kind == "u4" for kind, _, _ in stored) >= 12 * 4 + 1 + 1  # the Linears and the patch embedding
    assert result["bytes"] <= 4.5e6  # 4-bit codes: 7 MB with int8 ones


# ---------------------------------------------------------------------------------------------
# The IR of small models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_the_folder_holds_model_xml_and_model_bin_only(exported, setting):
    ir = exported[setting].ir
    assert sorted(p.name for p in ir.iterdir()) == ["model.bin", "model.xml"]
    size = (ir / "model.xml").stat().st_size + (ir / "model.bin").stat().st_size
    assert exported[setting].result == {**exported[setting].counts, "bytes": size}
    assert not [p for p in ir.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_the_ir_round_trips(exported, setting):
    """The IR, given as its folder or its model.xml, computes what the ONNX file computes on OpenVINO,
    and carries its metadata."""
    path, ir = exported[setting].onnx, exported[setting].ir
    x = random_images(16, img_size(setting[0]), seed=3)
    onnx_model, onnx_info = load_onnx(path, threads=1, runtime="openvino", precision="f32")
    expected = onnx_model(x)
    for given in (ir, ir / "model.xml", str(ir)):
        ir_model, info = load_onnx(given, threads=1, runtime="openvino", precision="f32")
        got = ir_model(x)
        assert got.shape == (16, 10) and (got - expected).abs().max() <= 1e-5
        assert info == onnx_info and ir_model.precision == "f32"
    assert ir_model(x[:3]).shape == (3, 10)  # the batch is dynamic
    # the ONNX file's metadata_props, each under isvit in the IR's rt_info
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert set(props) == {"format", "model", "model_args", "config", "data_config", "export"}
    model = openvino.Core().read_model(str(ir / "model.xml"))
    assert {key: model.get_rt_info(["isvit", key]).astype(str) for key in props} == props


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_weights_are_stored_at_their_bit_width(exported, setting):
    """Below 7 bits every weight's codes are unsigned codes of the narrowest OpenVINO type that holds
    them (the outlier rows of a split product may take fewer levels, or stay int8 where one value a
    channel makes zero points cost more than codes); 7 and 8-bit weights stay int8."""
    model, ir = exported[setting].model, exported[setting].ir
    bits = setting[2]
    stored = weight_storage(ir)
    assert len(stored) == weight_products(model)
    by_type = collections.Counter(kind for kind, _, _ in stored)
    assert by_type[STORAGE[bits]] >= len(quantized_layers(model)) - 1, by_type  # all but an outlier product
    for kind, size, count in stored:
        assert WIDTH[kind] <= WIDTH[STORAGE[bits]] and size == -(-count * WIDTH[kind] // 8)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_openvino_runs_every_linear_of_the_ir_as_an_int8_fully_connected(exported, setting):
    """The narrow codes are folded back into int8 weights when OpenVINO compiles the IR: the same
    kernels as the ONNX file, every Linear an int8 FullyConnected."""
    model, path, ir = exported[setting].model, exported[setting].onnx, exported[setting].ir
    size = ARCHITECTURES[setting[0]][1]["img_size"]
    kernels = compiled_kernels(load_onnx(ir, threads=1, runtime="openvino")[0], size)
    assert kernels == compiled_kernels(load_onnx(path, threads=1, runtime="openvino")[0], size)
    linears = sum(isinstance(layer, QuantLinear) for _, layer in quantized_layers(model))
    assert len(kernels) >= linears and all("i8" in kernel.lower() for _, _, kernel in kernels), kernels


def test_a_full_precision_model_exports_too(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(VIT[0], pretrained=False, **TINY).eval()
    config = isvit.resolve_data_config(model, input_size=32)
    result = export_openvino(model, tmp_path / "ir", model_name=VIT[0], config=None, data_config=config,
                             model_args=TINY)
    assert result["integer"] == result["float"] == 0 and weight_storage(tmp_path / "ir") == []
    ir_model, info = load_onnx(tmp_path / "ir", threads=1, runtime="openvino", precision="f32")
    assert info["config"] is None and info["model_args"] == TINY
    x = random_images(4, 32, seed=3)
    with torch.no_grad():
        assert torch.allclose(ir_model(x), model(x), atol=1e-4)


def test_an_interrupted_write_leaves_nothing(exported, tmp_path, monkeypatch):
    path = exported[SETTINGS[0]].onnx

    def interrupted(model, output, *args, **kwargs):
        Path(output).write_text("<?xml")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(openvino, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_openvino(path, tmp_path / "ir")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_folder_is_filled(exported, tmp_path):
    path = exported[SETTINGS[0]].onnx
    (tmp_path / "ir").mkdir()
    assert write_openvino(path, tmp_path / "ir") > 0
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["model.bin", "model.xml"]


# ---------------------------------------------------------------------------------------------
# Refusals and damaged IRs: one sentence each
# ---------------------------------------------------------------------------------------------

def non_empty(tmp_path: Path) -> Path:
    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "notes.txt").write_text("mine")
    return tmp_path / "ir"


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "ir"


DESTINATIONS = {
    "non-empty folder": (non_empty, "is not empty: give a new or empty folder"),
    "a file": (lambda tmp_path: non_empty(tmp_path) / "notes.txt", "notes.txt is a file, not a folder"),
    "under a file": (under_a_file, "file is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(DESTINATIONS))
def test_a_destination_that_cannot_take_the_ir_is_refused_before_the_work(exported, tmp_path, monkeypatch, case):
    make, message = DESTINATIONS[case]
    model = exported[SETTINGS[0]].model
    folder = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr("isvit.openvino_ir.export_onnx", lambda *a, **k: pytest.fail("exported before the check"))
    with pytest.raises(IsvitError) as error:
        export_openvino(model, folder, model_name=VIT[0], config=None, data_config=data_config("vit"))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert sorted(tmp_path.rglob("*")) == before


def without_metadata(ir: Path, target: Path) -> Path:
    shutil.copytree(ir, target)
    xml = (target / "model.xml").read_text()
    (target / "model.xml").write_text(re.sub(r"<isvit>.*</isvit>", "", xml, flags=re.S))
    return target


def truncated_weights(ir: Path, target: Path) -> Path:
    shutil.copytree(ir, target)
    data = (target / "model.bin").read_bytes()
    (target / "model.bin").write_bytes(data[: len(data) // 2])
    return target


BAD_IR = {
    "no model.xml": (lambda ir, target: target.mkdir() or target, "model.xml does not exist"),
    "missing .xml": (lambda ir, target: target / "other.xml", "other.xml does not exist"),
    "metadata stripped": (without_metadata, "is not an ONNX model exported by isvit"),
    "truncated weights": (truncated_weights, "OpenVINO cannot read"),
}


@pytest.mark.parametrize("case", list(BAD_IR))
def test_a_damaged_ir_is_one_sentence(exported, image_folder, tmp_path, capsys, case):
    make, message = BAD_IR[case]
    path = make(exported[SETTINGS[0]].ir, tmp_path / "bad")
    with pytest.raises(IsvitError) as error:
        load_onnx(path, runtime="openvino")
    assert message in str(error.value) and "\n" not in str(error.value)
    err = error_of(capsys, ["eval", "--onnx", str(path), "--data", str(image_folder), "--runtime", "openvino",
                            "--quiet"])
    assert message in err


def test_onnxruntime_refuses_an_ir_in_one_sentence(exported, image_folder, capsys):
    ir = exported[SETTINGS[0]].ir
    for given in (ir, ir / "model.xml"):
        with pytest.raises(IsvitError) as error:
            load_onnx(given)
        assert str(error.value) == (f"{given} is an OpenVINO IR, which onnxruntime cannot run: load it with "
                                    "runtime='openvino' (isvit eval: --runtime openvino)")
    err = error_of(capsys, ["eval", "--onnx", str(ir), "--data", str(image_folder), "--quiet"])
    assert "is an OpenVINO IR, which onnxruntime cannot run" in err


# ---------------------------------------------------------------------------------------------
# The command line: isvit export --openvino DIR, isvit eval --onnx DIR/model.xml --runtime openvino
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(exported, tmp_path_factory) -> Path:
    """The small W4/A4 ViT of ``exported`` saved as an integer checkpoint."""
    setting = exported[SETTINGS[0]]
    path = tmp_path_factory.mktemp("saved") / "vit_w4a4.safetensors"
    save_quantized(setting.model, path, model_name=VIT[0], config=setting.config, data_config=data_config("vit"),
                   model_args=VIT[1])
    return path


def test_cli_export_writes_the_ir_beside_the_onnx_file_and_eval_runs_it(saved, image_folder, tmp_path, capsys):
    onnx_path, ir = tmp_path / "out" / "vit.onnx", tmp_path / "out" / "vit_ir"
    assert main(["export", "--quantized", str(saved), "--onnx", str(onnx_path), "--openvino", str(ir),
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    products = "(7 integer products, 1 in float (see docs/onnx.md))"  # as test_export.py counts them
    size = sum(p.stat().st_size for p in ir.iterdir())
    assert printed == [f"exported {onnx_path}: {onnx_path.stat().st_size / 1e6:.1f} MB {products}",
                       f"exported {ir} (OpenVINO IR): {size / 1e6:.1f} MB {products}"]
    assert sorted(p.name for p in ir.iterdir()) == ["model.bin", "model.xml"]

    # eval --onnx DIR/model.xml --runtime openvino: the ONNX file's top-1 and top-5 on OpenVINO
    results = {}
    for given in (onnx_path, ir / "model.xml"):
        out = tmp_path / "eval.json"
        assert main(["eval", "--onnx", str(given), "--runtime", "openvino", "--data", str(image_folder),
                     "--batch-size", "3", "--threads", "1", "--workers", "0", "--json", str(out), "--quiet"]) == 0
        results[given] = json.loads(out.read_text())
        assert results[given]["images"] == 8 and results[given]["w_bits"] == 4 and results[given]["onnx"] == str(given)
    first, second = results.values()
    assert (first["top1"], first["top5"]) == (second["top1"], second["top5"])
    assert "(openvino " in capsys.readouterr().out


def test_cli_export_writes_the_ir_alone(saved, tmp_path, capsys):
    ir = tmp_path / "ir"
    assert main(["export", "--quantized", str(saved), "--openvino", str(ir), "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"exported {ir} (OpenVINO IR): ")
    assert [p.name for p in tmp_path.iterdir()] == ["ir"]  # the ONNX graph it was built from is gone
    assert sorted(p.name for p in ir.iterdir()) == ["model.bin", "model.xml"]


@pytest.mark.parametrize("argv, message", [
    (["--openvino", "{folder}", "--onnx", "{onnx}"], "is not empty: give a new or empty folder"),
    ([], "nothing would be written: give --onnx FILE, --openvino DIR or both"),
    (["--openvino", "{under_file}"], "notes.txt is a file, not a folder"),
    (["--openvino", "{new}", "--onnx", "{inside_new}"], "is inside --openvino"),
], ids=["non-empty folder", "no output", "under a file", "onnx inside"])
def test_cli_export_refusals_are_one_sentence_before_the_work(tmp_path, capsys, argv, message):
    """Refused before the checkpoint is read: a missing checkpoint would be another sentence."""
    folder = non_empty(tmp_path)
    names = {"folder": folder, "onnx": tmp_path / "m.onnx", "under_file": folder / "notes.txt" / "ir",
             "new": tmp_path / "new", "inside_new": tmp_path / "new" / "m.onnx"}
    before = sorted(tmp_path.rglob("*"))
    err = error_of(capsys, ["export", "--quantized", str(tmp_path / "none.safetensors"),
                            *(a.format(**names) for a in argv)])
    assert message in err and sorted(tmp_path.rglob("*")) == before
