"""The per-method configs (config.py): each holds only what its method reads; every config
round-trips through every place one is written (``to_dict``, ``quantize --json``, checkpoints, ONNX
metadata); the command line refuses an option the method does not read; files written by isvit's
earlier single ``QuantConfig`` still load (small ones committed in tests/data/quantconfig_files)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import isvit
from isvit import cli
from isvit.checkpoint import load_quantized, save_quantized
from isvit.config import PRESETS, EndToEnd, IsvitConfig, MinmaxConfig, Reconstruction, RepqConfig, config_from_dict
from isvit.export import export_onnx
from isvit.pipeline import applied_config, compute_dtypes_on
from isvit.runtime import load_onnx

from conftest import CALIB_DIR, SMALL_VIT, VIT_TINY_WEIGHTS, error_of, random_images, small_vit

OLD_FILES = Path(__file__).parent / "data" / "quantconfig_files"
OLD_ARGS = {"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
needs_shared = pytest.mark.skipif(not VIT_TINY_WEIGHTS.is_file(), reason="../shared is not present")

# Every field away from its default where the method allows it
EXAMPLES = {
    "minmax": MinmaxConfig(w_bits=8, a_bits=6, calib_size=12, seed=3, softmax_quantizer="sulq", act_percentile=0.995,
                           rotate=True, outlier_ratio=4.0, bias_correction=False),
    "repq": RepqConfig(w_bits=4, a_bits=5, calib_size=12, seed=2, softmax_quantizer="uniform", act_percentile=0.99,
                       outlier_ratio=6.0),
    "isvit": IsvitConfig.from_preset("fast", w_bits=4, a_bits=8, calib_size=12, seed=1, iters=2, batch_size=4,
                                     qdrop=0.25, rounding="adaround", round_reg=10.0, learn_scales=True, scale_lr=1e-2,
                                     stage1=False, fold=False, gptq=True, outlier_ratio=0.0, init_size=8, rotate=False,
                                     softmax_quantizer="log2sqrt2", bias_correction=True, act_percentile=0.995,
                                     end_to_end=EndToEnd(epochs=1, batch_size=6, lr=1e-3, loss="mse")),
}


def as_run_on_cpu(config):
    """``config.resolved()`` with the compute dtypes "auto" as they run on this machine's CPU and the
    loss "auto" of an end-to-end stage that runs as a classifier takes it ("kl"): what
    ``applied_config`` records for the classifiers these tests quantize."""
    config = compute_dtypes_on(config.resolved(), "cpu")
    if isinstance(config, IsvitConfig) and config.end_to_end.epochs and config.end_to_end.loss == "auto":
        config = dataclasses.replace(config, end_to_end=dataclasses.replace(config.end_to_end, loss="kl"))
    return config


# ---------------------------------------------------------------------------------------------
# What each config holds
# ---------------------------------------------------------------------------------------------

def test_each_config_holds_only_what_its_method_reads():
    fields = {method: {f.name for f in dataclasses.fields(type(c))} for method, c in EXAMPLES.items()}
    assert fields["repq"] == fields["minmax"]
    isvit_only = {"preset", "reconstruction", "end_to_end", "stage1", "fold", "gptq", "init_size"}
    assert fields["isvit"] == fields["repq"] | isvit_only
    for cls in (RepqConfig, MinmaxConfig):
        for name in isvit_only:
            with pytest.raises(TypeError):
                cls(**{name: None})
    for config in EXAMPLES.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.w_bits = 3


def test_the_methods_defaults_are_plain_field_defaults():
    assert (MinmaxConfig().softmax_quantizer, RepqConfig().softmax_quantizer, IsvitConfig().softmax_quantizer) == \
        ("uniform", "log2sqrt2", "sulq")
    assert (MinmaxConfig().calib_size, RepqConfig().calib_size, IsvitConfig().calib_size) == (32, 32, 1024)
    assert (MinmaxConfig().bias_correction, RepqConfig().bias_correction, IsvitConfig().bias_correction) == \
        (True, True, False)
    assert (MinmaxConfig().outlier_ratio, RepqConfig().outlier_ratio, IsvitConfig().outlier_ratio) == (0.0, 0.0, 8.0)
    assert not MinmaxConfig().placement().post_ln_per_channel and RepqConfig().placement().post_ln_per_channel
    assert IsvitConfig(fold=False).placement().post_ln_per_channel is False


def test_a_preset_is_a_reconstruction_per_bit_range_and_changes_go_through_at():
    assert PRESETS["paper"].at(6, 6) == Reconstruction() and PRESETS["paper"].at(3, 3) == Reconstruction(iters=1000)
    fast = PRESETS["fast"].at(3, 3, iters=50)
    assert (fast.iters, fast.rounding, fast.round_lr, fast.loss) == (50, "offset", 0.03, "fisher")
    assert PRESETS["fast"].at(3, 3, rounding="adaround").round_lr == 0.3  # the preset's for that rounding
    with pytest.raises(isvit.IsvitError, match="Reconstruction has no setting 'drop_prob'"):
        PRESETS["fast"].at(3, 3, drop_prob=0.1)
    with pytest.raises(isvit.IsvitError, match="IsvitConfig has no setting 'method'"):
        IsvitConfig.from_preset("fast", method="isvit")
    with pytest.raises(isvit.IsvitError, match="learns its rounding: give its learning rate round_lr"):
        Reconstruction(rounding="offset")
    # the config asks its preset at its own bit widths, whenever they change
    base = IsvitConfig(preset="fast", w_bits=6, a_bits=6)
    assert dataclasses.replace(base, w_bits=3, a_bits=3).resolved().reconstruction == PRESETS["fast"].at(3, 3)


# ---------------------------------------------------------------------------------------------
# Round trips: to_dict, checkpoints, ONNX metadata, --json
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", EXAMPLES)
def test_to_dict_round_trips_through_json(method):
    config = EXAMPLES[method]
    text = json.dumps(config.to_dict())
    assert config_from_dict(json.loads(text)) == config.resolved()
    assert config_from_dict(json.loads(text)).to_dict() == config.to_dict()
    with pytest.raises(TypeError):
        config_from_dict({**config.to_dict(), "unknown": 1})
    assert config_from_dict({**config.to_dict(), "top1": 50.0}, strict=False) == config.resolved()


@pytest.mark.parametrize("method", EXAMPLES)
def test_every_methods_config_round_trips_through_a_checkpoint_and_onnx_metadata(tmp_path, method):
    config = EXAMPLES[method]
    images = random_images(12, seed=0)
    qmodel = isvit.quantize(small_vit(), images, config, progress=False)
    applied = applied_config(qmodel, config)
    assert applied == as_run_on_cpu(config)  # nothing asked for was skipped
    path = tmp_path / "q.safetensors"
    save_quantized(qmodel, path, model_name=SMALL_VIT[0], config=config, data_config={"input_size": [3, 64, 64]},
                   model_args=SMALL_VIT[1])
    rebuilt, info = load_quantized(path)
    assert info["config"] == applied
    onnx = tmp_path / "q.onnx"
    export_onnx(rebuilt, onnx, model_name=SMALL_VIT[0], config=info["config"], data_config=info["data_config"],
                model_args=SMALL_VIT[1])
    _, onnx_info = load_onnx(onnx)
    assert onnx_info["config"] == applied


@needs_shared
@pytest.mark.parametrize("method, extra", [
    ("minmax", ["--rotate", "--outlier-ratio", "4", "--no-bias-correction"]),
    ("repq", ["--act-percentile", "0.995", "--softmax-quantizer", "uniform", "--seed", "2"]),
    ("isvit", ["--preset", "fast", "--iters", "1", "--recon-batch-size", "4", "--no-stage1", "--no-fold", "--qdrop",
               "0.25", "--rounding", "adaround", "--round-reg", "5", "--no-rotate"]),
])
def test_the_command_lines_config_round_trips_through_json_checkpoint_and_onnx(tmp_path, method, extra):
    """The config ``isvit quantize`` built from its options is the one its --json records, its
    checkpoint holds, and the ONNX file exported from that checkpoint carries."""
    saved, result, onnx = tmp_path / "q.safetensors", tmp_path / "r.json", tmp_path / "q.onnx"
    argv = ["quantize", "--model", "vit_tiny_patch16_224", "--weights", str(VIT_TINY_WEIGHTS), "--calib",
            str(CALIB_DIR), "--calib-size", "4", "--method", method, "--w-bits", "4", "--a-bits", "6", "--quiet",
            "--save", str(saved), "--json", str(result), *extra]
    assert cli.main(argv) == 0
    assert cli.main(["export", "--quantized", str(saved), "--onnx", str(onnx)]) == 0
    from_json = config_from_dict(json.loads(result.read_text()), strict=False)
    assert from_json == load_quantized(saved)[1]["config"] == load_onnx(onnx)[1]["config"]
    assert from_json == applied_config_of_args(argv)


def applied_config_of_args(argv):
    """The config the command line builds, as the run applies it (every option above is honoured)."""
    args = cli.build_parser().parse_args(argv)
    return as_run_on_cpu(cli.build_config(args))


# ---------------------------------------------------------------------------------------------
# The command line: options a method does not read, the deprecated --no-reparam
# ---------------------------------------------------------------------------------------------

def _quantize_argv(*extra):
    return ["quantize", "--model", "vit_tiny_patch16_224", "--weights", "/nonexistent/weights.safetensors",
            "--calib", "/nonexistent", "--save", "q.safetensors", "--w-bits", "4", "--a-bits", "4", *extra]


@pytest.mark.parametrize("extra, sentence", [
    (["--method", "repq", "--iters", "5"], "--method repq does not read --iters: it is I&S-ViT's"),
    (["--method", "minmax", "--preset", "fast", "--loss", "mse"], "does not read --preset, --loss: they are I&S-ViT's"),
    (["--method", "repq", "--no-stage1"], "--method repq does not read --no-stage1"),
    (["--method", "minmax", "--gptq"], "--method minmax does not read --gptq"),
    (["--method", "isvit", "--round-lr", "0.1"], "--round-lr would not be read: it is the learnt rounding's"),
    (["--method", "isvit", "--preset", "fast", "--round-reg", "5"], "--round-reg would not be read: it is AdaRound's"),
    (["--method", "isvit", "--scale-lr", "0.1"], "--scale-lr would not be read: no step size is learnt here"),
])
def test_an_option_the_method_does_not_read_is_refused_before_any_work(monkeypatch, capsys, extra, sentence):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", no_work)
    assert sentence in error_of(capsys, _quantize_argv(*extra))


def test_no_reparam_is_a_deprecated_alias_of_no_fold(monkeypatch, capsys):
    seen = []

    def stop(args, quantizable=False):
        seen.append(cli.build_config(args))
        raise isvit.IsvitError("stopped by the test")

    monkeypatch.setattr(cli, "_prepare", stop)
    for flag in ("--no-reparam", "--no-fold"):
        assert cli.main(_quantize_argv("--method", "isvit", flag)) == 2
        err = capsys.readouterr().err
        assert ("--no-reparam is deprecated and will be removed in the next release: use --no-fold" in err) == \
            (flag == "--no-reparam")
    assert [c.fold for c in seen] == [False, False]


# ---------------------------------------------------------------------------------------------
# isvit's earlier QuantConfig: its files, its keyword arguments
# ---------------------------------------------------------------------------------------------

OLD_CONFIGS = {
    # the fast preset as it was then: float32 (its reconstruction's compute dtype did not exist yet)
    "isvit_fast_w4a4": IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=16, iters=3, batch_size=8,
                                               rotate=True, compute_dtype="float32", end_to_end=EndToEnd()),
    "isvit_paper_w6a6": IsvitConfig.from_preset("paper", w_bits=6, a_bits=6, calib_size=16, iters=3, batch_size=8,
                                                fold=False, qdrop=0.25, rotate=False),
    "repq_w4a4": RepqConfig(w_bits=4, a_bits=4, calib_size=16),
    "minmax_w8a8": MinmaxConfig(w_bits=8, a_bits=8, calib_size=16, rotate=True),
}


def _old_images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # as make.py drew them


@pytest.mark.parametrize("name", OLD_CONFIGS)
def test_checkpoints_written_with_quantconfig_load_to_the_same_logits(name):
    model, info = load_quantized(OLD_FILES / f"{name}.safetensors")
    assert info["config"] == OLD_CONFIGS[name].resolved() and info["model_args"] == OLD_ARGS
    with torch.no_grad():
        assert torch.equal(model(_old_images()), load_file(OLD_FILES / "logits.safetensors")[name])


def test_an_onnx_file_written_with_quantconfig_loads_with_its_config():
    model, info = load_onnx(OLD_FILES / "isvit_fast_w4a4.onnx")
    assert info["config"] == OLD_CONFIGS["isvit_fast_w4a4"].resolved()
    expected = load_file(OLD_FILES / "logits.safetensors")["isvit_fast_w4a4"]
    got = model(_old_images())
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("name, missing", [("isvit_paper_w6a6", "act_percentile"), ("minmax_w8a8", "act_percentile"),
                                           ("isvit_paper_w6a6", "rotate")])
def test_a_file_from_before_a_field_existed_reads_as_it_was_made(tmp_path, name, missing):
    """Before act_percentile existed every grid was searched from 0.999 (not the fast preset's 0.99
    of today), and before rotate existed no model was rotated."""
    with safe_open(str(OLD_FILES / f"{name}.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118
    stored = json.loads(metadata["config"])
    if missing == "rotate":
        assert stored["rotate"] is False  # a file without it was made unrotated
    del stored[missing]
    older = tmp_path / "older.safetensors"
    save_file(tensors, str(older), metadata={**metadata, "config": json.dumps(stored)})
    model, info = load_quantized(older)
    assert info["config"].act_percentile == 0.999 if missing == "act_percentile" else info["config"].rotate is False
    assert info["config"] == OLD_CONFIGS[name].resolved()
    with torch.no_grad():
        assert torch.equal(model(_old_images()), load_file(OLD_FILES / "logits.safetensors")[name])


def test_quantconfig_is_deprecated_and_gives_the_methods_own_config():
    with pytest.warns(DeprecationWarning, match="QuantConfig is deprecated"):
        config = isvit.QuantConfig(method="isvit", preset="fast", w_bits=3, a_bits=3, iters=7, drop_prob=0.1,
                                   reparameterize=False)
    assert config == IsvitConfig.from_preset("fast", w_bits=3, a_bits=3, iters=7, qdrop=0.1, fold=False)
    with pytest.warns(DeprecationWarning):
        assert isvit.QuantConfig(method="minmax", w_bits=8, a_bits=8) == MinmaxConfig(w_bits=8, a_bits=8)
    with pytest.warns(DeprecationWarning), pytest.raises(isvit.IsvitError, match="repq does not read iters"):
        isvit.QuantConfig(method="repq", iters=5)
