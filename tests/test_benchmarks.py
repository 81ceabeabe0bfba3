"""The benchmarks' bookkeeping (benchmarks/record.py): a row is reused only when asked for and only
for the very command that made it; outputs are never half written."""

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

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
    assert Path(args.out) == record.ROOT / "results" / "int8_latency.json"
    checkpoint = tmp_path / "isvit_w4a4.safetensors"
    checkpoint.write_bytes(b"")
    args = int8_latency.parse_args(["--quantized", str(checkpoint), "--make", "repq:4:8", "minmax:8:8",
                                    "--threads", "2", "--ov-precision", "bf16", "--cache", str(tmp_path)])
    assert args.quantized == [str(checkpoint)] and args.make == [("repq", 4, 8), ("minmax", 8, 8)]
    assert args.threads == [2] and args.ov_precision == "bf16"
    assert int8_latency.parse_args(["--quantized", str(checkpoint)]).make == []  # a file given: nothing made
    for wrong in (["--repeats", "5"], ["--make", "isvit:4:4"], ["--make", "repq:4"], ["--threads", "0"],
                  ["--quantized", str(tmp_path / "missing.safetensors")], ["--ov-precision", "f16"]):
        with pytest.raises(SystemExit):
            int8_latency.parse_args(wrong)


def test_int8_latency_ratios_are_to_the_same_runtimes_fp32_and_to_nncf(int8_latency):
    times = {("pytorch", "fp32"): [12.0, 10.0, 11.0, 9.0, 10.0],
             ("onnxruntime", "fp32"): [8.0] * 5,
             ("onnxruntime", "repq_w8a8"): [4.0, 5.0, 3.0, 4.0, 4.0],
             ("openvino", "fp32"): [6.0] * 5,
             ("openvino", "nncf_int8"): [3.0] * 5,
             ("openvino", "repq_w8a8"): [2.0] * 5}
    rows = {(r["runtime"], r["model"]): r for r in int8_latency.summarize(times, batch=4, threads=2)}
    torch_fp32 = rows[("pytorch", "fp32")]
    assert (torch_fp32["median_ms"], torch_fp32["q1_ms"], torch_fp32["q3_ms"], torch_fp32["iqr_ms"]) == (10.0, 10.0,
                                                                                                         11.0, 1.0)
    assert torch_fp32["ms_per_image"] == 2.5 and torch_fp32["calls"] == 5 and torch_fp32["threads"] == 2
    assert torch_fp32["vs_fp32"] == 1.0 and torch_fp32["vs_nncf_int8"] is None
    assert rows[("onnxruntime", "repq_w8a8")]["vs_fp32"] == 2.0  # onnxruntime's fp32, not PyTorch's
    assert rows[("onnxruntime", "repq_w8a8")]["vs_nncf_int8"] is None
    assert rows[("openvino", "repq_w8a8")]["vs_fp32"] == 3.0 and rows[("openvino", "repq_w8a8")]["vs_nncf_int8"] == 1.5
    assert rows[("openvino", "nncf_int8")]["vs_nncf_int8"] == 1.0
    table = int8_latency.markdown_table(list(rows.values())).splitlines()
    assert len(table) == 2 + len(times)
    assert "| openvino | repq_w8a8 | 4 | 2 | 2.0 | 0.0 | 0.50 | 3.00x | 1.50x |" in table
    assert int8_latency.model_name({"method": "isvit", "w_bits": 4, "a_bits": 4}, {"isvit_w4a4"}) == "isvit_w4a4_2"
