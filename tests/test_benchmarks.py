"""The benchmarks' bookkeeping (benchmarks/record.py): a row is reused only when asked for and only
for the very command that made it; outputs are never half written."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS / "studies")]  # the table scripts and record.py; the studies

import record


def test_no_resume_file_reuses_nothing():
    assert record.resumable_rows(None) == {}


@pytest.mark.parametrize("layout", ["list", "dict"])  # accuracy.py writes a list, isvit_accuracy.py a dict
def test_only_a_row_of_the_same_command_is_resumed(tmp_path, monkeypatch, layout):
    rows = [{"command": ["eval", "--threads", "2"], "top1": 1.0}, {"top1": 2.0}]  # the second: no command
    path = tmp_path / "old.json"
    path.write_text(json.dumps(rows if layout == "list" else {"a": rows[0], "b": rows[1]}))
    resume = record.resumable_rows(str(path))
    assert resume == {("eval", "--threads", "2"): rows[0]}
    ran = []

    class Ran(Exception):
        pass

    def run(cmd, **kwargs):
        ran.append(cmd[3:6])
        raise Ran

    monkeypatch.setattr(record.subprocess, "run", run)
    assert record.run_cli(["eval", "--threads", "2"], resume) == rows[0] and ran == []
    with pytest.raises(Ran):  # another thread count: run again
        record.run_cli(["eval", "--threads", "1"], resume)
    assert ran == [["eval", "--threads", "1"]]


def test_write_json_leaves_no_half_written_file(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    record.write_json(path, {"a": 1})
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(record.json, "dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        record.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]


# benchmarks/int8_latency.py: its command line and the summary of fake timings (no model is run)

@pytest.fixture
def int8_latency():
    return importlib.import_module("int8_latency")


def test_int8_latency_defaults_and_choices(tmp_path, int8_latency):
    args = int8_latency.parse_args([])
    assert (args.threads, args.batch_sizes, args.repeats, args.nncf_images) == ([1, 2], [1, 32], [50, 10], 300)
    assert args.quantized == [] and args.make == [("repq", 8, 8)] and args.ov_precision is None and args.cache is None
    assert args.model == "vit_tiny_patch16_224" == record.MODEL
    assert Path(args.out) == record.ROOT / "results" / "int8_latency.json"
    checkpoint = tmp_path / "isvit_w4a4.safetensors"
    checkpoint.write_bytes(b"")
    args = int8_latency.parse_args(["--quantized", str(checkpoint), "--make", "repq:4:8", "minmax:8:8",
                                    "--threads", "2", "--ov-precision", "bf16", "--cache", str(tmp_path)])
    assert args.quantized == [str(checkpoint)] and args.make == [("repq", 4, 8), ("minmax", 8, 8)]
    assert args.threads == [2] and args.ov_precision == "bf16"
    assert int8_latency.parse_args(["--quantized", str(checkpoint)]).make == []  # a file given: nothing made
    # the ViT-B, its isvit models made here
    args = int8_latency.parse_args(["--model", "vit_base_patch16_224", "--make", "isvit:8:8", "isvit:4:8", "isvit:4:4",
                                    "--batch-sizes", "1", "8"])
    assert args.model == "vit_base_patch16_224" and args.make == [("isvit", 8, 8), ("isvit", 4, 8), ("isvit", 4, 4)]
    for wrong in (["--repeats", "5"], ["--make", "gptq:4:4"], ["--make", "repq:4"], ["--make", "isvit:4:x"],
                  ["--threads", "0"], ["--quantized", str(tmp_path / "missing.safetensors")], ["--ov-precision", "f16"],
                  ["--model", "vit_small_patch16_224"]):
        with pytest.raises(SystemExit):
            int8_latency.parse_args(wrong)


def test_int8_latency_isvit_made_here_is_the_fast_preset_at_one_iteration(int8_latency):
    from isvit.config import PRESETS, RepqConfig

    config, source = int8_latency.made_config(("isvit", 4, 8), calib_size=16, seed=3)
    assert (config.method, config.preset, config.w_bits, config.a_bits) == ("isvit", "fast", 4, 8)
    # the fast preset's reconstruction at W4/A8 but for the one iteration
    assert config.resolved().reconstruction == PRESETS["fast"].at(4, 8, iters=1)
    assert (config.calib_size, config.seed) == (16, 3)
    assert "fast preset, 1 iteration, 16 images" in source and "not its accuracy" in source
    config, source = int8_latency.made_config(("repq", 8, 8), calib_size=16, seed=3)
    assert config == RepqConfig(w_bits=8, a_bits=8, calib_size=16, seed=3)
    assert int8_latency.SHARED_WEIGHTS == {record.MODEL: record.WEIGHTS}  # the ViT-B has none: random weights


def test_int8_latency_isvit_models_get_a_second_openvino_row_at_f32(int8_latency):
    paths = {"fp32": Path("fp32.onnx"), "nncf_int8": Path("nncf.xml"), "isvit_w4a8": Path("q.onnx")}
    assert int8_latency.openvino_models(paths, ["isvit_w4a8"], None) == {
        "fp32": (Path("fp32.onnx"), None), "nncf_int8": (Path("nncf.xml"), None),
        "isvit_w4a8": (Path("q.onnx"), None), "isvit_w4a8@f32": (Path("q.onnx"), "f32")}
    # --ov-precision: every model at that precision, one row each
    assert int8_latency.openvino_models(paths, ["isvit_w4a8"], "bf16") == {
        name: (path, "bf16") for name, path in paths.items()}


def test_int8_latency_ratios_are_to_the_same_runtimes_fp32_and_int8_baselines(int8_latency):
    times = {("pytorch", "fp32"): [12.0, 10.0, 11.0, 9.0, 10.0],
             ("onnxruntime", "fp32"): [8.0] * 5,
             ("onnxruntime", "ort_int8"): [5.0] * 5,
             ("onnxruntime", "repq_w8a8"): [4.0, 5.0, 3.0, 4.0, 4.0],
             ("openvino", "fp32"): [6.0] * 5,
             ("openvino", "nncf_int8"): [3.0] * 5,
             ("openvino", "repq_w8a8"): [2.0] * 5,
             ("openvino", "repq_w8a8@f32"): [1.5] * 5}
    ov_precisions = {"fp32": "bf16", "nncf_int8": "bf16", "repq_w8a8": "bf16", "repq_w8a8@f32": "f32"}
    rows = {(r["runtime"], r["model"]): r for r in int8_latency.summarize(times, batch=4, threads=2,
                                                                        ov_precisions=ov_precisions)}
    torch_fp32 = rows[("pytorch", "fp32")]
    assert (torch_fp32["median_ms"], torch_fp32["q1_ms"], torch_fp32["q3_ms"], torch_fp32["iqr_ms"]) == (10.0, 10.0,
                                                                                                         11.0, 1.0)
    assert torch_fp32["ms_per_image"] == 2.5 and torch_fp32["calls"] == 5 and torch_fp32["threads"] == 2
    assert torch_fp32["vs_fp32"] == 1.0 and torch_fp32["vs_nncf_int8"] is None and torch_fp32["vs_ort_int8"] is None
    assert torch_fp32["ov_precision"] is None  # the precision is OpenVINO's only
    assert rows[("onnxruntime", "repq_w8a8")]["vs_fp32"] == 2.0  # onnxruntime's fp32, not PyTorch's
    assert rows[("onnxruntime", "repq_w8a8")]["vs_nncf_int8"] is None
    assert rows[("onnxruntime", "repq_w8a8")]["vs_ort_int8"] == 1.25  # onnxruntime's own INT8 model
    ort_int8 = rows[("onnxruntime", "ort_int8")]
    assert ort_int8["vs_ort_int8"] == 1.0 and ort_int8["vs_fp32"] == 1.6
    assert rows[("onnxruntime", "fp32")]["ov_precision"] is None
    assert rows[("openvino", "repq_w8a8")]["vs_fp32"] == 3.0 and rows[("openvino", "repq_w8a8")]["vs_nncf_int8"] == 1.5
    assert rows[("openvino", "repq_w8a8")]["vs_ort_int8"] is None  # onnxruntime's model runs on onnxruntime only
    assert rows[("openvino", "nncf_int8")]["vs_nncf_int8"] == 1.0
    assert rows[("openvino", "repq_w8a8")]["ov_precision"] == "bf16"
    assert rows[("openvino", "repq_w8a8@f32")]["ov_precision"] == "f32"
    at_f32 = rows[("openvino", "repq_w8a8@f32")]
    assert at_f32["vs_fp32"] == 4.0 and at_f32["vs_nncf_int8"] == 2.0
    table = int8_latency.markdown_table(list(rows.values())).splitlines()
    assert len(table) == 2 + len(times)
    assert "vs onnxruntime int8" in table[0] and "OpenVINO precision" in table[0]
    assert "| openvino | repq_w8a8 | bf16 | 4 | 2 | 2.0 | 0.0 | 0.50 | 3.00x | 1.50x |  |" in table
    assert "| openvino | repq_w8a8@f32 | f32 | 4 | 2 | 1.5 | 0.0 | 0.38 | 4.00x | 2.00x |  |" in table
    assert "| onnxruntime | repq_w8a8 |  | 4 | 2 | 4.0 | 0.0 | 1.00 | 2.00x |  | 1.25x |" in table
    assert int8_latency.model_name({"method": "isvit", "w_bits": 4, "a_bits": 4}, {"isvit_w4a4"}) == "isvit_w4a4_2"


def test_int8_latency_reuses_a_cached_int8_model_only_when_made_the_same_way(tmp_path, int8_latency):
    model = tmp_path / "vit_base_patch16_224_ort_int8_8img_seed0.onnx"
    wanted = {"fp32_onnx_sha256": "abc", "images": 8, "seed": 0, "onnxruntime": "1.32.0"}
    assert int8_latency.cached(model, wanted) is None  # nothing there
    model.write_bytes(b"model")
    record.write_json(model.with_suffix(".json"), {**wanted, "calibration_s": 2.0})
    assert int8_latency.cached(model, wanted) == {**wanted, "calibration_s": 2.0}
    assert int8_latency.cached(model, {**wanted, "seed": 1}) is None
    assert int8_latency.cached(model, {**wanted, "onnxruntime": "1.33.0"}) is None


def test_int8_latency_report_names_the_cpu_and_its_kernel_flags(int8_latency):
    cpu = record.cpu_info()
    line = int8_latency.cpu_line(cpu)
    assert line.startswith(f"CPU: {cpu['model']}, {cpu['cores']} cores;")
    assert all(f"{flag} {'yes' if cpu[flag] else 'no'}" in line for flag in ("avx2", "avx512f", "vnni", "amx_int8"))


def test_where_a_model_was_saved_does_not_stop_a_row_being_resumed(tmp_path):
    row = {"command": ["quantize", "--seed", "1", "--save", "/tmp/a/w3a3_s1.safetensors"], "top1": 3.0}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"fast/w3a3": row}))
    resume = record.resumable_rows(str(path))
    assert record.run_cli(["quantize", "--seed", "1"], resume) == row
    assert record.run_cli(["quantize", "--seed", "1", "--save", "elsewhere.safetensors"], resume) == row
    assert record.resume_key(["quantize", "--seed", "1", "--save", "x"]) != record.resume_key(["quantize", "--seed", "2"])


# benchmarks/isvit_accuracy.py: seeds, the ablation's settings and the summary (no model is trained)

@pytest.fixture
def isvit_accuracy():
    return importlib.import_module("isvit_accuracy")


def test_without_stage1_the_same_steps_go_to_stage3(isvit_accuracy):
    from isvit.config import PRESETS

    # ViT-Ti: stage 1 trains 13 units (all but the patch embedding), stage 3 all 14
    iters = PRESETS["fast"].at(3, 3).iters
    assert isvit_accuracy.same_steps_iters("fast", 3) == round((13 + 14) * iters / 14) == 193
    flags = isvit_accuracy.setting_flags("w3a3-no-stage1-same-steps", "fast")
    assert flags == ["--w-bits", "3", "--a-bits", "3", "--no-stage1", "--iters", "193"]
    assert isvit_accuracy.same_steps_iters("fast", 4) == round((13 + 14) * PRESETS["fast"].at(4, 4).iters / 14) == 270
    for bits in ("3", "4"):  # the whole ablation at both bit-widths
        for name in ("log2sqrt2", "uniform-softmax", "no-stage1", "no-reparam", "no-outlier-split"):
            assert isvit_accuracy.setting_flags(f"w{bits}a{bits}-{name}", "fast")[:4] == ["--w-bits", bits, "--a-bits", bits]


def test_seeds_run_each_setting_once_per_seed_and_summarise_mean_and_std(tmp_path, monkeypatch, isvit_accuracy):
    runs = []

    def fake_run(args, resume=None, key=None):
        seed = int(args[args.index("--seed") + 1])
        runs.append((args[args.index("--w-bits") + 1], seed, "--save" in args))
        return {"seed": seed, "top1": 10.0 + 2 * seed, "calib_seconds": 100.0 + seed, "threads": 1,
                "peak_rss_mb": 1000.0, "command": [str(a) for a in args]}

    monkeypatch.setattr(isvit_accuracy, "run_cli", fake_run)
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["isvit_accuracy.py", "--only", "w3a3", "w4a4-log2sqrt2", "--seeds", "0", "1", "2",
                                      "--out", str(out), "--save-dir", str(tmp_path)])
    isvit_accuracy.main()
    assert runs == [("3", 0, True), ("3", 1, True), ("3", 2, True), ("4", 0, True), ("4", 1, True), ("4", 2, True)]
    data = json.loads(out.read_text())
    assert set(data) == {*(f"fast/{s}/seed{i}" for s in ("w3a3", "w4a4-log2sqrt2") for i in range(3)), "summary"}
    summary = data["summary"]["fast/w3a3"]
    assert summary["top1"] == [10.0, 12.0, 14.0] and summary["top1_mean"] == 12.0 and summary["top1_std"] == 2.0
    assert summary["seeds"] == [0, 1, 2] and summary["calib_seconds_median"] == 101.0
    # one seed: the rows keep their plain names, and the standard deviation is 0
    monkeypatch.setattr(sys, "argv", ["isvit_accuracy.py", "--only", "w3a3", "--out", str(out)])
    isvit_accuracy.main()
    data = json.loads(out.read_text())
    assert set(data) == {"fast/w3a3", "summary"} and data["summary"]["fast/w3a3"]["top1_std"] == 0.0


# benchmarks/studies/softmax_error.py: the post-Softmax quantizers' error on a model's attention maps

def test_softmax_error_measures_each_quantizer_on_every_blocks_maps():
    import copy

    from isvit.config import IsvitConfig
    from isvit.pipeline import set_quantizers
    from isvit.wrap import wrap_model

    from conftest import random_images, small_vit

    softmax_error = importlib.import_module("softmax_error")
    model = wrap_model(copy.deepcopy(small_vit()), IsvitConfig(w_bits=8, a_bits=8).placement())
    set_quantizers(model, False)
    x = random_images(12, seed=0)
    result = softmax_error.measure(model.eval(), None, [3, 8], x[:4], x[4:])
    assert set(result) == {"sulq", "log2sqrt2", "uniform"}
    for kind, by_bits in result.items():
        assert all(len(by_bits[bits]["out_rel"]) == 2 for bits in (3, 8))  # the small ViT's two blocks
        assert all(abs(r - 1) < 0.05 for r in by_bits[8]["row_sum"])  # 8 bits keep each row's mass
        for metric in ("mse", "rel_mse", "out_rel"):
            pairs = list(zip(by_bits[3][metric], by_bits[8][metric]))
            assert all(0 < e8 <= e3 for e3, e8 in pairs), (kind, metric)
            # log-sqrt2's grid below its top value is the same at every bit-width; more bits only reach
            # further down, which these random maps (all within a factor 2) never need
            assert kind == "log2sqrt2" or all(e8 < e3 / 10 for e3, e8 in pairs), (kind, metric)
    # a quantizer that is exact makes no error
    class Exact:
        def quantize(self, a):
            return a

    maps = softmax_error.attention_maps(model, x[:2])
    exact = softmax_error.errors(Exact(), maps[:1])
    assert exact["mse"] == exact["rel_mse"] == exact["out_rel"] == 0.0 and abs(exact["row_sum"] - 1) < 1e-6


# benchmarks/studies/heldout_blocks.py: each unit's loss on calibration images beside held-out ones

def test_heldout_blocks_measures_every_units_own_and_accumulated_error():
    import isvit
    from isvit.wrap import forward_units

    from conftest import random_images, small_vit

    heldout_blocks = importlib.import_module("heldout_blocks")
    fp, x = small_vit(), random_images(8, seed=2)
    qmodel = isvit.quantize(small_vit(), random_images(8, seed=1), isvit.MinmaxConfig(w_bits=3, a_bits=3, calib_size=8),
                            progress=False)
    losses = heldout_blocks.unit_losses(qmodel, fp, x, batch_size=3)  # batches of 3, 3 and 2 images
    assert list(losses) == [u.name for u in forward_units(qmodel)] == ["patch_embed", "blocks.0", "blocks.1", "head"]
    first = losses["patch_embed"]
    assert first["local"] == pytest.approx(first["cumulative"])  # the first unit has the images as input
    assert all(v > 0 for name, unit in losses.items() for k, v in unit.items() if (name, k) != ("patch_embed", "first_token"))
    assert losses["head"]["first_token"] == pytest.approx(losses["head"]["cumulative"])  # one output per image
    # the model against itself makes no error
    itself = heldout_blocks.unit_losses(fp, fp, x, batch_size=3)
    assert all(v == 0 for unit in itself.values() for v in unit.values())


# benchmarks/studies/grid_sensitivity.py: held-out scores of copies with the activation grids nudged

def test_grid_sensitivity_nudges_only_the_activation_scales_and_by_the_seed():
    import torch

    import isvit
    from isvit.quantizers import UniformQuantizer, named_quantizers

    from conftest import random_images, small_vit

    grid_sensitivity = importlib.import_module("grid_sensitivity")
    qmodel = isvit.quantize(small_vit(), random_images(8, seed=1), isvit.MinmaxConfig(w_bits=4, a_bits=4, calib_size=8),
                            progress=False)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    same = grid_sensitivity.perturbed(qmodel, 0.0, seed=0).state_dict()
    assert all(torch.equal(same[k], v) for k, v in before.items())
    nudged = grid_sensitivity.perturbed(qmodel, 1e-3, seed=0).state_dict()
    assert all(torch.equal(qmodel.state_dict()[k], v) for k, v in before.items())  # the model itself untouched
    scales = {f"{name}.scale" for name, q in named_quantizers(qmodel, "activation") if isinstance(q, UniformQuantizer)}
    changed = {k for k, v in before.items() if not torch.equal(nudged[k], v)}
    assert changed == scales and scales
    assert all(torch.allclose(nudged[k], before[k], rtol=1e-2) for k in changed)
    again = grid_sensitivity.perturbed(qmodel, 1e-3, seed=0).state_dict()
    other = grid_sensitivity.perturbed(qmodel, 1e-3, seed=1).state_dict()
    assert all(torch.equal(again[k], nudged[k]) for k in scales)
    assert any(not torch.equal(other[k], nudged[k]) for k in scales)


def test_resumed_only_summarises_the_rows_found_and_runs_nothing(tmp_path, monkeypatch, isvit_accuracy):
    monkeypatch.setattr(record.subprocess, "run", lambda *a, **k: pytest.fail("nothing may run"))
    old = tmp_path / "old.json"
    rows = {}
    for seed in (0, 2):  # seed 1 was never run
        command = ["quantize", "--method", "isvit", "--preset", "fast", "--no-fp", "--model", isvit_accuracy.MODEL,
                   "--weights", isvit_accuracy.WEIGHTS, "--calib", isvit_accuracy.CALIB, "--calib-size", "1024",
                   "--data", isvit_accuracy.VAL, "--batch-size", "64", "--threads", "1", "--seed", str(seed),
                   "--w-bits", "3", "--a-bits", "3", "--save", f"/tmp/x/w3a3_s{seed}.safetensors"]
        losses = {"blocks.0": {"before": 1.0 + seed, "after": 0.5, "restored": False}}
        rows[f"fast/w3a3/seed{seed}"] = {"command": [str(a) for a in command], "seed": seed, "top1": 30.0 + seed,
                                         "calib_seconds": 600.0, "threads": 1, "peak_rss_mb": 3000.0,
                                         "reconstruction": {"stage1": {}, "stage3": losses}}
    old.write_text(json.dumps(rows))
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["isvit_accuracy.py", "--only", "w3a3", "--seeds", "0", "1", "2", "--resumed-only",
                                      "--resume-from", str(old), "--out", str(out)])
    isvit_accuracy.main()
    summary = json.loads(out.read_text())["summary"]["fast/w3a3"]
    assert summary["seeds"] == [0, 2] and summary["top1_mean"] == 31.0
    assert summary["stage3_loss"] == {"blocks.0": {"before": 2.0, "after": 0.5}}


@pytest.mark.parametrize("preset", ["fast", "paper", "thorough"])
def test_the_cli_takes_every_setting_isvit_accuracy_runs(isvit_accuracy, preset):
    # the CLI refuses an option that the method or the chosen reconstruction would not read
    from isvit.cli import build_config, build_parser

    common = ["quantize", "--method", "isvit", "--preset", preset, "--no-fp", "--model", isvit_accuracy.MODEL,
              "--weights", "w.safetensors", "--calib", "calib", "--data", "val", "--seed", "0"]
    for extra in ([], ["--iters", "60", "--qdrop", "0", "--outlier-ratio", "0"]):
        for name in isvit_accuracy.SETTINGS:
            args = build_parser().parse_args(common + extra + isvit_accuracy.setting_flags(name, preset))
            build_config(args)


def test_summary_reads_the_losses_of_rows_recorded_before_and_after_they_moved(isvit_accuracy):
    # isvit quantize --json now writes the losses under "reconstruction_losses" and the reconstruction's
    # settings under "reconstruction"; earlier rows hold the losses under "reconstruction"
    losses = {"stage1": {}, "stage3": {"blocks.0": {"before": 2.0, "after": 1.0, "restored": False}}}
    row = {"seed": 0, "top1": 30.0, "calib_seconds": 1.0, "threads": 1, "peak_rss_mb": 1.0}
    new = {**row, "reconstruction": {"iters": 100, "loss": "fisher"}, "reconstruction_losses": losses}
    old = {**row, "seed": 1, "reconstruction": losses}
    assert isvit_accuracy.summarise([new, old])["stage3_loss"] == {"blocks.0": {"before": 2.0, "after": 1.0}}
    settings_only = {**row, "reconstruction": {"iters": 100, "loss": "fisher"}}  # no losses recorded
    assert "stage3_loss" not in isvit_accuracy.summarise([settings_only])


def test_a_row_recorded_with_a_renamed_flag_is_resumed_by_the_command_with_its_new_name():
    assert record.resume_key(["quantize", "--no-reparam"]) == record.resume_key(["quantize", "--no-fold"])


def test_tune_heldout_settings_are_config_fields_and_the_earlier_names_still_read():
    import dataclasses

    from isvit.config import PRESETS, IsvitConfig, MinmaxConfig

    tune_heldout = importlib.import_module("tune_heldout")
    config = tune_heldout.config_of(tune_heldout.parse_setting("preset=fast,iters=3,drop_prob=0.25,reparameterize=False"))
    assert config == IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, iters=3, qdrop=0.25, fold=False)
    assert tune_heldout.config_of(tune_heldout.parse_setting("preset=fast,qdrop=0.25,fold=False,w_bits=3,a_bits=3")) == \
        IsvitConfig.from_preset("fast", w_bits=3, a_bits=3, qdrop=0.25, fold=False)
    assert tune_heldout.config_of(tune_heldout.parse_setting("method=minmax,w_bits=8,a_bits=8,calib_size=16")) == \
        MinmaxConfig(w_bits=8, a_bits=8, calib_size=16)
    # e2e_ fields change the preset's end-to-end stage at those bits: off, or another learning rate
    off = tune_heldout.config_of(tune_heldout.parse_setting("preset=fast,w_bits=3,a_bits=3,iters=140,e2e_epochs=0"))
    assert off.resolved().end_to_end.epochs == 0 and off.resolved().reconstruction.iters == 140
    lr = tune_heldout.config_of(tune_heldout.parse_setting("preset=fast,w_bits=3,a_bits=3,e2e_lr=1e-3"))
    assert lr.resolved().end_to_end == dataclasses.replace(PRESETS["fast"].end_to_end_at(3, 3), lr=1e-3)
    # every setting recorded in results/ still makes its config
    for path in sorted((BENCHMARKS.parent / "results").glob("tune_heldout*.jsonl")):
        for line in path.read_text().splitlines():
            tune_heldout.config_of(tune_heldout.parse_setting(json.loads(line)["setting"]))


def test_tune_heldout_calib_flips_calibrates_on_the_images_and_their_mirror_images(monkeypatch, tmp_path):
    import torch

    tune_heldout = importlib.import_module("tune_heldout")
    generator = torch.Generator().manual_seed(0)
    calib, held = torch.randn(4, 3, 2, 5, generator=generator), torch.randn(6, 3, 2, 5, generator=generator)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(30, 3))
    monkeypatch.setattr(tune_heldout, "open_split", lambda args: (
        model, (calib, torch.zeros(4)), (held, torch.zeros(6, dtype=torch.long)), model(held).detach()))
    seen = []
    monkeypatch.setattr(tune_heldout.isvit, "quantize", lambda m, images, config, progress: seen.append(images) or m)
    out = tmp_path / "rows.jsonl"
    for flips in ([], ["--calib-flips"]):
        monkeypatch.setattr(sys, "argv", ["tune_heldout.py", "--no-baseline", "--set", "preset=fast,iters=1",
                                          "--out", str(out), *flips])
        tune_heldout.main()
    assert torch.equal(seen[0], calib)
    assert torch.equal(seen[1], torch.cat([calib, calib.flip(-1)]))  # each image, then each one mirrored
    plain, flipped = (json.loads(line) for line in out.read_text().splitlines())
    assert plain["split"] == "4 calibration / 6 held-out images of imagenet-calib-1000 (split seed 123)"
    assert flipped["split"] == plain["split"] + ", the calibration images also mirrored left-right"
    assert flipped["kl"] == plain["kl"] == 0.0  # the same (unquantized) model scored on the same held-out images


def test_unit_probe_settings_take_the_earlier_qdrop_name_and_a_learnt_roundings_default_lr():
    from isvit.config import Reconstruction

    unit_probe = importlib.import_module("unit_probe")
    assert Reconstruction(**unit_probe.settings_of({"drop_prob": 0})).qdrop == 0
    assert Reconstruction(**unit_probe.settings_of({})).qdrop == 0.5
    assert Reconstruction(**unit_probe.settings_of({"rounding": "offset"})).round_lr == unit_probe.ROUND_LR
    assert Reconstruction(**unit_probe.settings_of({"rounding": "offset", "round_lr": 0.03})).round_lr == 0.03


def test_iters_reruns_an_earlier_presets_ablation_and_resumes_rows_by_the_iterations_they_trained(
        tmp_path, monkeypatch, isvit_accuracy):
    # --iters 60 reruns the fast preset of 2026-12-04; no-stage1-same-steps follows it (13 + 14 units)
    assert isvit_accuracy.same_steps_iters("fast", 3, 60) == round((13 + 14) * 60 / 14) == 116
    assert isvit_accuracy.setting_flags("w3a3-no-stage1-same-steps", "fast", 60)[-2:] == ["--iters", "116"]
    ran = []

    def fake_quantize(cmd, **kwargs):  # `python -m isvit.cli ARGS --json OUT --quiet`, writing OUT
        args = cmd[3:cmd.index("--json")]
        ran.append(args)
        result = {"seed": 1, "top1": 50.0, "calib_seconds": 1.0, "threads": 1, "peak_rss_mb": 1.0,
                  "reconstruction": {"iters": isvit_accuracy.command_iters(args)}}  # the settings, as the CLI writes
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(result))

    monkeypatch.setattr(record.subprocess, "run", fake_quantize)
    monkeypatch.setattr(record, "cpu_info", dict)  # platform's own subprocesses would meet the fake
    common = ["quantize", "--method", "isvit", "--preset", "fast", "--no-fp", "--model", isvit_accuracy.MODEL,
              "--weights", isvit_accuracy.WEIGHTS, "--calib", isvit_accuracy.CALIB, "--calib-size", "1024",
              "--data", isvit_accuracy.VAL, "--batch-size", "64", "--threads", "1", "--seed", "0",
              "--w-bits", "3", "--a-bits", "3"]
    common = [str(a) for a in common]
    # seed 0 run when the preset trained 60 (no --iters in its command), recorded with the flag's and the
    # JSON's earlier layout (--no-reparam, "iters" at the top level)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"fast/w3a3-no-reparam": {"command": common + ["--no-reparam"], "seed": 0, "iters": 60,
                                                        "top1": 30.0, "calib_seconds": 9.0, "threads": 1,
                                                        "peak_rss_mb": 1.0}}))
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["isvit_accuracy.py", "--only", "w3a3-no-reparam", "--iters", "60", "--seeds", "0", "1",
                                      "--resume-from", str(old), "--out", str(out)])
    isvit_accuracy.main()
    assert len(ran) == 1 and ran[0][ran[0].index("--seed") + 1] == "1" and ran[0][ran[0].index("--iters") + 1] == "60"
    summary = json.loads(out.read_text())["summary"]["fast/w3a3-no-reparam"]
    assert summary["seeds"] == [0, 1] and summary["iters"] == [60] and summary["top1_mean"] == 40.0
    # today's preset trains more: the same plain command without --iters 60 does not take the old row
    ran.clear()
    monkeypatch.setattr(sys, "argv", ["isvit_accuracy.py", "--only", "w3a3-no-reparam", "--resume-from", str(old),
                                      "--out", str(out)])
    isvit_accuracy.main()
    assert len(ran) == 1 and "--iters" not in ran[0]


def test_postln_error_measures_each_post_layernorm_quantizer_alone_in_an_unchanged_model():
    import torch

    from isvit.pipeline import set_quantizers

    from conftest import random_images, small_vit

    postln_error = importlib.import_module("postln_error")
    fp = small_vit()
    x = random_images(12, seed=0)
    with torch.no_grad():
        reference = fp(x[4:])
    errors = {}
    for bits in (3, 8):
        for rotate in (False, True):
            for fold in (True, False):
                qmodel = postln_error.build(fp, bits, rotate, fold, x[:4])
                result = postln_error.output_errors(qmodel, x[4:])
                # with every quantizer off the model is the full-precision one (rotation and fold are exact)
                set_quantizers(qmodel, False)
                with torch.no_grad():
                    assert torch.allclose(qmodel(x[4:]), reference, atol=1e-4)
                assert set(result) == {"qkv", "fc1"} and all(len(v) == 2 for v in result.values())  # 2 blocks
                assert all(e > 0 for v in result.values() for e in v)
                errors[bits, rotate, fold] = result
    # more bits, less error; a per-tensor grid (no percentile per channel fitted on 4 random images'
    # 68 tokens, which clips) nearly none at 8 bits
    for rotate in (False, True):
        for fold in (True, False):
            for layer in ("qkv", "fc1"):
                pairs = list(zip(errors[3, rotate, fold][layer], errors[8, rotate, fold][layer]))
                assert all(e8 < e3 / (10 if not fold else 2) for e3, e8 in pairs)


def test_unit_probe_refits_only_the_post_softmax_grids_to_the_maps_the_block_computes_now():
    import torch

    from isvit.config import IsvitConfig
    from isvit.quantizers import SULQuantizer
    from isvit.wrap import forward_units

    from conftest import small_vit

    unit_probe = importlib.import_module("unit_probe")
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    config = IsvitConfig(w_bits=3, a_bits=3, rotate=False)
    units = forward_units(record.untrained_isvit(small_vit(), config, images))
    block, x = units[1], units[0](images)
    attn = block.body.attn
    softmax_q = attn.av.a_quantizer
    assert isinstance(softmax_q, SULQuantizer)
    softmax_q.ymin.fill_(-30.0)  # a grid far from any map
    others = {k: v.clone() for k, v in block.state_dict().items() if ".av.a_quantizer." not in k}
    maps = []
    attn.av.register_forward_pre_hook(lambda module, args: maps.append(args[0].detach().clone()))
    unit_probe.refit_softmax_grids(block, x)
    fresh = SULQuantizer(3)
    fresh.calibrate(maps[0])
    assert softmax_q.ymin.item() > -30.0
    assert all(torch.equal(getattr(softmax_q, n), getattr(fresh, n)) for n in ("eta", "ymin", "ymax"))
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in others.items())  # nothing else refitted
