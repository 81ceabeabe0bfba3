"""The CLI contract: options, JSON fields, one-sentence errors, no half-written outputs."""

import json
import os
from pathlib import Path

import pytest
import timm
import torch

import isvit
from isvit.checkpoint import load_quantized
from isvit.cli import main
from isvit.quantizers import LogSqrt2Quantizer

from conftest import CALIB_DIR as CALIB
from conftest import TINY_RESNET, TINY_VIT, error_of, umask
from conftest import VAL_DIR as VAL
from conftest import VIT_TINY_WEIGHTS as WEIGHTS

needs_shared = pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared is not present")


def quantize_args(tmp_path, *extra):
    return [
        "quantize", "--model", "vit_tiny_patch16_224", "--weights", str(WEIGHTS), "--calib", str(CALIB),
        "--data", str(VAL), "--quiet", *extra,
    ]


def linear_biases(model) -> dict[str, torch.Tensor]:
    return {name: m.bias for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_out_of_range_is_one_sentence(tmp_path, capsys, bits):
    err = error_of(capsys, quantize_args(tmp_path, "--method", "repq", "--w-bits", bits, "--a-bits", "4"))
    assert "w_bits must be an integer from 2 to 8" in err


def test_outlier_ratio_of_at_most_one_is_one_sentence(tmp_path, capsys):
    err = error_of(capsys, quantize_args(tmp_path, "--method", "repq", "--w-bits", "4", "--a-bits", "4",
                                         "--outlier-ratio", "0.5"))
    assert "outlier_ratio must be 0 (off) or greater than 1" in err


def test_unknown_model(tmp_path, capsys):
    err = error_of(capsys, ["eval", "--model", "vit_gigantic_nonsense", "--data", str(tmp_path), "--quiet"])
    assert "unknown model 'vit_gigantic_nonsense'" in err


def test_missing_weights_file(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    err = error_of(capsys, ["eval", "--model", "vit_tiny_patch16_224", "--weights", str(missing), "--data", str(tmp_path)])
    assert str(missing) in err and "does not exist" in err


def test_weights_of_another_architecture(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "small.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).state_dict(), str(path))
    err = error_of(capsys, ["eval", "--model", "vit_tiny_patch16_224", "--weights", str(path), "--data", str(tmp_path)])
    assert "missing keys" in err and "blocks.2" in err


@needs_shared
def test_missing_data_folder(tmp_path, capsys):
    err = error_of(capsys, ["eval", "--model", "vit_tiny_patch16_224", "--weights", str(WEIGHTS), "--data", str(tmp_path / "none")])
    assert "does not exist" in err


@needs_shared
def test_isvit_with_ablation_flags(tmp_path, capsys, training, quantized_by_cli, real_vit):
    out = tmp_path / "r.json"
    argv = quantize_args(tmp_path, "--method", "isvit", "--w-bits", "4", "--a-bits", "4", "--limit", "8",
                         "--calib-size", "8", "--batch-size", "8", "--preset", "fast", "--iters", "1",
                         "--recon-batch-size", "4", "--no-stage1", "--no-fold", "--softmax-quantizer",
                         "log2sqrt2", "--cache-dtype", "float16", "--compute-dtype", "bfloat16", "--learn-scales", "--loss", "mse",
                         "--cache-device", "cpu", "--gptq", "--qdrop", "0.5", "--outlier-ratio", "12", "--no-fp",
                         "--no-rotate", "--act-percentile", "0.995", "--rounding", "ste", "--json", str(out))
    assert main(argv) == 0
    result = json.loads(out.read_text())
    recon = result["reconstruction"]  # the reconstruction's settings, under their config names
    assert result["method"] == "isvit" and recon["iters"] == 1 and recon["batch_size"] == 4
    assert result["stage1"] is False and result["fold"] is False
    assert result["softmax_quantizer"] == "log2sqrt2" and recon["learn_scales"] is True
    assert recon["loss"] == "mse" and recon["cache_device"] == "cpu" and recon["cache_dtype"] == "float16"
    assert recon["compute_dtype"] == "bfloat16"
    assert result["gptq"] is True and recon["qdrop"] == 0.5 and result["outlier_ratio"] == 12.0
    assert result["rotate"] is False and result["act_percentile"] == 0.995 and "fp_top1" not in result
    assert recon["rounding"] == "ste" and recon["round_lr"] is None  # the latent weights, not the preset's offsets
    assert list(result["reconstruction_losses"]) == ["stage3"]  # each unit's loss before and after, per stage
    assert set(result["reconstruction_losses"]["stage3"]["blocks.0"]) == {"before", "after", "restored"}

    # and the flags did what they say, on the model:
    ((_, qmodel),) = quantized_by_cli
    units = ["patch_embed", *(f"blocks.{i}" for i in range(12)), "head"]
    assert training.units("stage 1") == [] and training.units("stage 3") == units  # --no-stage1
    assert all(c["inputs_dtype"] == torch.float16 and c["inputs_device"].type == "cpu" for c in training.calls)
    for i, call in enumerate(training.calls[1:13]):
        fp_block = real_vit.blocks[i]
        # --no-fold: the LayerNorms reach stage 3 as they were (no fold), before per-tensor grids
        assert torch.equal(call["before"]["norm1.weight"], fp_block.norm1.weight)
        assert torch.equal(call["before"]["norm2.bias"], fp_block.norm2.bias)
        assert call["before"]["attn.qkv.input_quantizer.scale"].numel() == 1
        # --learn-scales with --rounding ste: the weights' grids moved in training
        assert not torch.equal(call["before"]["mlp.fc1.weight_quantizer.scale"], call["after"]["mlp.fc1.weight_quantizer.scale"])
    assert all(type(block.attn.av.a_quantizer) is LogSqrt2Quantizer for block in qmodel.blocks)
    assert not any(block.mlp.fc1.input_quantizer.per_channel for block in qmodel.blocks)
    # --outlier-ratio 12: block 7's fc2 input channel at ~78x the median has a grid of its own
    assert qmodel.blocks[7].mlp.fc2.input_quantizer.outlier_ratio == 12.0
    assert qmodel.blocks[7].mlp.fc2.input_quantizer.scale.unique().numel() == 2


@needs_shared
def test_no_bias_correction_keeps_the_pretrained_biases(tmp_path, quantized_by_cli, real_vit):
    out = tmp_path / "r.json"
    assert main(quantize_args(tmp_path, "--method", "minmax", "--w-bits", "8", "--a-bits", "8", "--limit", "4",
                              "--calib-size", "8", "--no-fp", "--no-bias-correction", "--json", str(out))) == 0
    assert json.loads(out.read_text())["bias_correction"] is False
    ((_, qmodel),) = quantized_by_cli
    fp_biases = linear_biases(real_vit)
    biases = linear_biases(qmodel)
    assert len(biases) == 49 and all(torch.equal(b, fp_biases[name]) for name, b in biases.items())


def test_unknown_method_rejected_by_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(quantize_args(tmp_path, "--method", "gptq", "--w-bits", "4", "--a-bits", "4"))
    assert exit_info.value.code == 2
    assert "invalid choice: 'gptq'" in capsys.readouterr().err


@needs_shared
def test_corrupt_image_is_one_sentence_and_writes_no_json(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.JPEG").write_bytes(b"not a jpeg at all")
    (data / "labels.txt").write_text("broken.JPEG\t3\n")
    out = tmp_path / "out.json"
    err = error_of(capsys, ["eval", "--model", "vit_tiny_patch16_224", "--weights", str(WEIGHTS), "--data", str(data),
                            "--json", str(out), "--quiet"])
    assert "broken.JPEG" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [data]


@needs_shared
def test_quantize_json_and_saved_model(tmp_path, capsys, quantized_by_cli, real_vit):
    out, saved = tmp_path / "r.json", tmp_path / "q.safetensors"
    argv = quantize_args(tmp_path, "--method", "minmax", "--w-bits", "8", "--a-bits", "4", "--limit", "16",
                         "--calib-size", "8", "--batch-size", "16", "--json", str(out), "--save", str(saved))
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "fp32" in table and "minmax" in table and "8/4" in table
    result = json.loads(out.read_text())
    for key in ("top1", "top5", "images", "method", "w_bits", "a_bits", "calib_size", "calib_seconds",
                "eval_seconds", "peak_rss_mb", "torch", "timm", "fp_top1"):
        assert key in result, key
    assert "iters" not in result and "reconstruction" not in result  # I&S-ViT's settings: minmax has none
    assert result["images"] == 16 and result["calib_size"] == 8 and result["method"] == "minmax"
    assert (result["w_bits"], result["a_bits"]) == (8, 4) and result["bias_correction"] is True
    assert 0 <= result["top1"] <= 100 and result["peak_rss_mb"] > 0
    assert result["saved"] == str(saved) and result["saved_bytes"] == saved.stat().st_size
    assert result["fp32_bytes"] > 3.5 * result["saved_bytes"]  # 8-bit codes instead of float32 weights
    assert f"saved {saved}: " in table and "x smaller)" in table
    ((_, qmodel),) = quantized_by_cli
    assert {q.bits for _, q in isvit.quantizers(qmodel, "weight")} == {8}
    assert {q.bits for _, q in isvit.quantizers(qmodel, "activation")} == {4}
    fp_biases = linear_biases(real_vit)  # bias correction (the default) changed every Linear's bias
    assert all(not torch.equal(b, fp_biases[name]) for name, b in linear_biases(qmodel).items())

    # The saved file alone rebuilds the same quantized model: same top-1 on the same images.
    model, info = load_quantized(saved)
    assert info["model"] == "vit_tiny_patch16_224" and info["config"].w_bits == 8
    from isvit import ImageFolderDataset, build_transform, evaluate, make_loader

    loader = make_loader(ImageFolderDataset(VAL, build_transform(info["data_config"]), limit=16), batch_size=16)
    assert evaluate(model, loader, progress=False)["top1"] == pytest.approx(result["top1"], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# A first user's path, on timm's tiny test ViT (no ../shared needed)
# ---------------------------------------------------------------------------------------------

def tiny_quantize_args(tiny_weights, calib, *extra):
    return ["quantize", "--model", TINY_VIT, "--weights", str(tiny_weights(TINY_VIT)), "--calib", str(calib),
            "--calib-size", "2", "--device", "cpu", "--quiet", *extra]


def test_quantize_without_data_saves_and_writes_json_without_evaluating(tmp_path, capsys, monkeypatch, image_folder,
                                                                       tiny_weights):
    import isvit.cli

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated without --data")

    monkeypatch.setattr(isvit.cli, "evaluate", no_evaluation)
    out, saved = tmp_path / "r.json", tmp_path / "q.safetensors"
    argv = tiny_quantize_args(tiny_weights, image_folder, "--method", "minmax", "--w-bits", "8", "--a-bits", "8",
                              "--json", str(out), "--save", str(saved))
    with umask(0o027):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1" not in printed and "calibration " in printed and f"saved {saved}: " in printed
    result = json.loads(out.read_text())
    assert result["data"] is None and result["calib_images"] == 2 and result["saved"] == str(saved)
    assert not {"top1", "top5", "images", "fp_top1", "eval_seconds"} & result.keys()
    # --json and --save files: 0666 less the umask (027), not a temporary file's 0600
    assert out.stat().st_mode & 0o777 == 0o640 and saved.stat().st_mode & 0o777 == 0o640
    _, info = load_quantized(saved)
    assert info["model"] == TINY_VIT and info["config"].method == "minmax"


def test_quantize_without_data_or_save_says_nothing_would_be_kept(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["quantize", "--model", TINY_VIT, "--weights", str(tmp_path / "missing.safetensors"), "--calib",
            str(tmp_path / "missing"), "--method", "repq", "--w-bits", "4", "--a-bits", "4", "--json", str(out)]
    err = error_of(capsys, argv)  # before anything is read: neither the weights nor the images are looked at
    assert "nothing would be kept" in err and "--data" in err and "--save" in err
    assert not out.exists()


def test_quantize_limit_without_data_is_refused(tmp_path, capsys):
    argv = ["quantize", "--model", TINY_VIT, "--calib", str(tmp_path), "--method", "repq", "--w-bits", "4",
            "--a-bits", "4", "--save", str(tmp_path / "q.safetensors"), "--limit", "8"]
    assert "--limit needs --data" in error_of(capsys, argv)


def test_quantize_refuses_an_unquantizable_model_before_any_download(tmp_path, capsys, timm_builds):
    argv = ["quantize", "--model", "resnet18", "--calib", str(tmp_path / "none"), "--data", str(tmp_path / "none"),
            "--method", "isvit", "--w-bits", "4", "--a-bits", "4", "--quiet"]
    err = error_of(capsys, argv)
    assert "supports timm VisionTransformer (ViT, DeiT), SwinTransformer, SwinTransformerV2, Beit, Eva" in err
    assert "models, not ResNet" in err
    assert timm_builds == [False]  # the architecture alone was built: no download, no image read


def test_export_refuses_an_unquantizable_model_before_any_download(tmp_path, capsys, timm_builds):
    out = tmp_path / "resnet.onnx"
    err = error_of(capsys, ["export", "--model", "resnet18", "--onnx", str(out)])
    assert "not ResNet" in err and timm_builds == [False] and not out.exists()


def test_eval_takes_a_full_precision_model_of_any_timm_family(tmp_path, capsys, image_folder, tiny_weights):
    out = tmp_path / "r.json"
    argv = ["eval", "--model", TINY_RESNET, "--weights", str(tiny_weights(TINY_RESNET)), "--data", str(image_folder),
            "--limit", "4", "--batch-size", "4", "--workers", "0", "--json", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["model"] == TINY_RESNET and result["method"] == "fp32" and result["images"] == 4


@pytest.mark.parametrize("preset", ["paper", "thorough", "fast"])
def test_isvit_long_presets_on_a_cpu_print_the_expected_duration_first(tmp_path, capsys, image_folder, tiny_weights,
                                                                       preset):
    argv = tiny_quantize_args(tiny_weights, image_folder, "--method", "isvit", "--w-bits", "4", "--a-bits", "4",
                              "--preset", preset, "--iters", "2", "--recon-batch-size", "2",
                              "--save", str(tmp_path / "q.safetensors"))
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "preset: about" in line]
    if preset != "fast":
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{preset} preset: about ") and "on this CPU (estimated from the first steps)" in lines[0]
        assert "--preset fast takes about " in lines[0]
    else:
        assert lines == []


def test_help_says_what_each_preset_does_and_points_at_the_measured_times(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "paper (default): the paper's settings" in text and "fast: for CPUs" in text and "thorough: for GPUs" in text
    assert "see docs/results.md#cost for measured times" in text
    assert " s at W" not in text and "hours on 2 CPU cores" not in text  # the figures live in docs/results.md only


# ---------------------------------------------------------------------------------------------
# eval --model, preprocessing options, devices
# ---------------------------------------------------------------------------------------------

def eval_args(*extra):
    return ["eval", "--model", "vit_tiny_patch16_224", "--weights", str(WEIGHTS), "--data", str(VAL), "--quiet", *extra]


def top1_top5(model, data_config, limit):
    dataset = isvit.ImageFolderDataset(VAL, isvit.build_transform(data_config), limit=limit)
    result = isvit.evaluate(model, isvit.make_loader(dataset, batch_size=limit, num_workers=0), progress=False)
    return result["top1"], result["top5"]


@needs_shared
def test_eval_model_prints_the_table_and_writes_the_json(tmp_path, capsys, real_vit):
    out = tmp_path / "e.json"
    assert main(eval_args("--limit", "8", "--batch-size", "4", "--json", str(out))) == 0
    table = capsys.readouterr().out.splitlines()
    result = json.loads(out.read_text())
    data_config = isvit.resolve_data_config(real_vit)
    top1, top5 = top1_top5(real_vit, data_config, 8)
    assert result["top1"] == top1 and result["top5"] == top5 and result["images"] == 8
    assert result["method"] == "fp32" and result["w_bits"] == result["a_bits"] == 32
    assert result["data_config"] == data_config and result["model"] == "vit_tiny_patch16_224"
    assert table[0].split() == ["model", "method", "W/A", "top-1", "top-5", "images"]
    assert table[2].split() == ["vit_tiny_patch16_224", "fp32", "32/32", f"{top1:.2f}", f"{top5:.2f}", "8"]


@needs_shared
def test_mean_and_std_options_reach_the_preprocessing(tmp_path, real_vit):
    out = tmp_path / "e.json"
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert main(eval_args("--limit", "8", "--json", str(out), "--mean", "0.485,0.456,0.406",
                          "--std", "0.229 0.224 0.225")) == 0
    result = json.loads(out.read_text())
    data_config = {**isvit.resolve_data_config(real_vit), **imagenet}
    assert result["data_config"] == data_config
    assert (result["top1"], result["top5"]) == top1_top5(real_vit, data_config, 8)


@pytest.mark.parametrize("option, value, message", [
    ("--mean", "0.5,0.5", "argument --mean: expected three numbers such as 0.5,0.5,0.5, got '0.5,0.5'"),
    ("--std", "a,b,c", "argument --std: expected three numbers such as 0.5,0.5,0.5, got 'a,b,c'"),
    ("--limit", "ten", "argument --limit: must be a positive integer, got 'ten'"),
    ("--limit", "0", "argument --limit: must be a positive integer, got '0'"),
])
def test_a_malformed_option_is_one_sentence_from_the_parser(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), option, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"isvit eval: error: {message}"


@needs_shared
def test_a_non_positive_std_is_one_sentence(tmp_path, capsys):
    out = tmp_path / "e.json"
    err = error_of(capsys, eval_args("--std", "0.5,0,0.5", "--json", str(out)))
    assert "std must be positive" in err and not out.exists()


@pytest.mark.parametrize("command", ["eval", "quantize"])
@pytest.mark.parametrize("device, message", [
    ("gpu0", "unknown device 'gpu0'"),
    ("cuda:x", "unknown device 'cuda:x'"),
    ("cuda", "device cuda was asked for but CUDA is not available"),
    ("cuda:1", "device cuda:1 was asked for but CUDA is not available"),
])
def test_an_unknown_or_unavailable_device_is_one_sentence(tmp_path, capsys, monkeypatch, command, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    argv = eval_args() if command == "eval" else quantize_args(tmp_path, "--method", "minmax", "--w-bits", "8", "--a-bits", "8")
    assert message in error_of(capsys, [*argv, "--device", device, "--json", str(out)])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Ctrl-C: exit status 130, no half-written file
# ---------------------------------------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("where", ["evaluation", "json"])
def test_ctrl_c_exits_with_130_and_leaves_no_file(tmp_path, capsys, monkeypatch, where):
    from isvit import cli

    if where == "evaluation":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "evaluate", interrupted)
    else:
        write_text = Path.write_text

        def interrupted(self, text, *args, **kwargs):
            write_text(self, text[: len(text) // 2], *args, **kwargs)  # half written, then Ctrl-C
            raise KeyboardInterrupt

        monkeypatch.setattr(Path, "write_text", interrupted)
    out = tmp_path / "e.json"
    assert main(eval_args("--limit", "2", "--json", str(out))) == 130
    assert capsys.readouterr().err.strip() == "isvit: interrupted"
    assert list(tmp_path.iterdir()) == []


@needs_shared
def test_a_real_sigint_exits_with_130_without_a_traceback(tmp_path):
    """The command in its own process, interrupted (SIGINT, as Ctrl-C sends it to the terminal's
    process group) while it evaluates with its two data-loading workers."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    out = tmp_path / "e.json"
    argv = [sys.executable, "-m", "isvit.cli", "eval", "--model", "vit_tiny_patch16_224", "--weights", str(WEIGHTS),
            "--data", str(VAL), "--batch-size", "10", "--json", str(out)]
    # A suite started as a background job (bash's `&`) runs with SIGINT ignored, which a child inherits
    # (and Python then never raises KeyboardInterrupt). A handler is not inherited: exec resets it to
    # the default, so the child starts with SIGINT at its default while this one is installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    err, started = bytearray(), threading.Event()

    def read():
        while chunk := os.read(process.stderr.fileno(), 4096):
            err.extend(chunk)
            if b"full precision" in err:  # the evaluation's progress bar is up
                started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(timeout=300), bytes(err)
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 130, bytes(err)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(timeout=10)
    text = err.decode()
    assert text.rstrip().endswith("isvit: interrupted") and "Traceback" not in text, text[-2000:]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Outputs that cannot be written: one sentence before any work, nothing left behind
# ---------------------------------------------------------------------------------------------

# Every output of every command: (command, option, kind) with kind "file" or "folder".
OUTPUTS = [
    ("eval", "--json", "file"),
    ("quantize", "--save", "file"),
    ("quantize", "--json", "file"),
    ("quantize", "--resume", "folder"),
    ("export", "--onnx", "file"),
    pytest.param("export", "--openvino", "folder", marks=pytest.mark.openvino),
]


def command_writing(option_of, path, image_folder, tiny_weights) -> list[str]:
    """The command of ``option_of`` = (command, option) on the tiny ViT with the output at ``path``."""
    command, option = option_of
    tiny = ["--model", TINY_VIT, "--weights", str(tiny_weights(TINY_VIT))]
    if command == "eval":
        argv = ["eval", *tiny, "--data", str(image_folder), "--quiet"]
    elif command == "quantize":
        argv = ["quantize", *tiny, "--calib", str(image_folder), "--data", str(image_folder), "--method", "minmax",
                "--w-bits", "8", "--a-bits", "8", "--calib-size", "2", "--limit", "2", "--workers", "0", "--quiet"]
    else:
        argv = ["export", *tiny]
    return [*argv, option, str(path)]


@pytest.fixture
def no_work(monkeypatch, tiny_weights):
    """Fails the test if the command builds or reads a model: the start of its work."""
    from isvit import cli

    tiny_weights(TINY_VIT)  # written before timm is closed

    def work(*args, **kwargs):
        pytest.fail("the work started before the output was refused")

    for name in ("load_model", "load_quantized", "load_onnx"):
        monkeypatch.setattr(cli, name, work)
    monkeypatch.setattr(timm, "create_model", work)


def a_folder_or_a_file(tmp_path, kind):
    """A folder where a file goes, a file where a folder goes."""
    if kind == "file":
        (tmp_path / "out").mkdir()
        return tmp_path / "out", "is a folder: give the name of a file to write"
    (tmp_path / "out").write_text("mine")
    return tmp_path / "out", "is a file, not a folder"


def under_a_file(tmp_path, kind):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt" / "new" / "out", f"{tmp_path / 'notes.txt'} is a file, not a folder"


def in_a_read_only_folder(tmp_path, kind):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder (the /proc case refuses for root)")
    (tmp_path / "read-only").mkdir(mode=0o500)
    return tmp_path / "read-only" / "new" / "out", f"no file can be created in {tmp_path / 'read-only'}"


def in_proc(tmp_path, kind):
    # /proc takes no new file, root's neither
    return Path("/proc/isvit-test/out"), "no file can be created in /proc ("


PLACES = {"a folder or a file": a_folder_or_a_file, "under a file": under_a_file,
          "read-only folder": in_a_read_only_folder, "in /proc": in_proc}


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("command, option, kind", OUTPUTS)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, image_folder, tiny_weights,
                                                                     no_work, command, option, kind, place):
    path, message = PLACES[place](tmp_path, kind)
    before = sorted(tmp_path.rglob("*"))
    err = error_of(capsys, command_writing((command, option), path, image_folder, tiny_weights))
    assert f"{option} {path}" in err and message in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, no trial file left


def test_a_resume_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, image_folder,
                                                                          tiny_weights, no_work):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    (tmp_path / "state").mkdir(mode=0o500)  # exists, its files cannot be replaced
    err = error_of(capsys, command_writing(("quantize", "--resume"), tmp_path / "state", image_folder, tiny_weights))
    assert f"cannot write --resume {tmp_path / 'state'}: no file can be created in {tmp_path / 'state'}" in err


@pytest.mark.openvino
def test_an_openvino_folder_that_is_not_empty_is_refused_before_any_work(tmp_path, capsys, image_folder,
                                                                        tiny_weights, no_work):
    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "notes.txt").write_text("mine")
    err = error_of(capsys, command_writing(("export", "--openvino"), tmp_path / "ir", image_folder, tiny_weights))
    assert err == f"isvit: error: --openvino {tmp_path / 'ir'} is not empty: give a new or empty folder"


def test_two_outputs_on_one_path_are_refused_before_any_work(tmp_path, capsys, image_folder, tiny_weights, no_work):
    argv = command_writing(("quantize", "--save"), tmp_path / "q.out", image_folder, tiny_weights)
    err = error_of(capsys, [*argv, "--json", str(tmp_path / "." / "q.out")])
    assert f"--save and --json are both {tmp_path / 'q.out'}: give each its own path" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_folders_of_the_outputs_are_created(tmp_path, capsys, image_folder, tiny_weights):
    saved, out, state = tmp_path / "a" / "b" / "q.safetensors", tmp_path / "c" / "r.json", tmp_path / "d" / "state"
    argv = command_writing(("quantize", "--save"), saved, image_folder, tiny_weights)
    assert main([*argv, "--json", str(out), "--resume", str(state)]) == 0
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["a/b/q.safetensors", "c/r.json", "d/state/state.pt"]  # and no trial file


def test_a_save_that_fails_while_writing_is_one_sentence_and_leaves_no_file(tmp_path, capsys, monkeypatch,
                                                                           image_folder, tiny_weights):
    import errno

    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # written in part, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    saved, out = tmp_path / "q.safetensors", tmp_path / "r.json"
    err = error_of(capsys, [*command_writing(("quantize", "--save"), saved, image_folder, tiny_weights),
                            "--json", str(out)])
    assert err == f"isvit: error: cannot write {saved} ({os.strerror(errno.ENOSPC)})"
    assert list(tmp_path.iterdir()) == []  # neither a half-written model nor the JSON of a run that failed


@pytest.mark.parametrize("command", ["eval", "quantize", "export"])
def test_help_states_the_rule_for_outputs(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "missing folders on an output's path are created (as mkdir -p)" in text
    assert "cannot be written" in text and "is refused before any work" in text
