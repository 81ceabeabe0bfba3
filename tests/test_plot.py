"""benchmarks/plot.py: the results picture, drawn from the benchmarks' JSON, read defensively."""

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plot(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("plot")


def cli_result(method, bits, top1, **extra):
    return {"method": method, "w_bits": bits, "a_bits": bits, "top1": top1, **extra}


def test_reads_full_precision_and_the_default_minmax_and_repq(tmp_path, plot):
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps([
        cli_result("fp32", 32, 82.6),
        cli_result("repq", 4, 30.0, bias_correction=False),  # the published variant: not the default
        cli_result("repq", 4, 38.9, bias_correction=True),
        cli_result("minmax", 6, 78.2),  # no bias_correction key: an older file, taken as the default
        {"method": "repq", "w_bits": 4, "a_bits": 8, "top1": 50.0},  # W != A: not on a bit-width axis
        {"method": "repq", "w_bits": 3},  # no top-1
        "not a result",
    ]))
    fp_top1, series = plot.read_accuracy(path)
    assert fp_top1 == 82.6 and series == {"repq": {4: 38.9}, "minmax": {6: 78.2}}


def test_reads_the_plain_settings_of_each_isvit_preset(tmp_path, plot):
    path = tmp_path / "isvit_accuracy.json"
    path.write_text(json.dumps({
        "fast/w4a4": cli_result("isvit", 4, 73.1, preset="fast"),
        "fast/w4a4-no-stage1": cli_result("isvit", 4, 64.9, preset="fast"),  # an ablation
        "paper/w6a6": cli_result("isvit", 6, 82.0),  # preset from the key
        "fast/w3a3": {"w_bits": 3, "a_bits": 3},  # no top-1
        "odd": [],
    }))
    assert plot.read_isvit(path) == {"isvit (fast preset)": {4: 73.1}, "isvit (paper preset)": {6: 82.0}}


def test_the_results_files_give_every_line_of_the_picture(plot):
    fp_top1, series = plot.read_accuracy(ROOT / "results" / "accuracy.json")
    series.update(plot.read_isvit(ROOT / "results" / "isvit_accuracy.json"))
    assert round(fp_top1, 2) == 82.62
    assert {"minmax", "repq"} <= series.keys() and {4, 6} <= series["repq"].keys()
    assert any(label.startswith("isvit") and {3, 4, 6} <= points.keys() for label, points in series.items())


def test_draws_a_png(tmp_path, plot):  # matplotlib: in the test extra, as in the plot extra
    out = tmp_path / "docs" / "results.png"
    plot.draw({"repq": {4: 38.9, 6: 80.6}, "isvit (fast preset)": {3: 8.1, 4: 73.1, 6: 81.7}}, 82.6, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_a_later_isvit_file_replaces_the_points_it_has(tmp_path, plot, monkeypatch):
    older, newer, accuracy = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "accuracy.json"
    older.write_text(json.dumps({f"fast/w{b}a{b}": cli_result("isvit", b, t, preset="fast")
                                 for b, t in ((3, 8.1), (4, 73.1), (6, 81.7))}))
    newer.write_text(json.dumps({"fast/w3a3": cli_result("isvit", 3, 20.0, preset="fast")}))
    accuracy.write_text(json.dumps([cli_result("fp32", 32, 82.6)]))
    drawn = {}
    monkeypatch.setattr(plot, "draw", lambda series, fp_top1, out: drawn.update(series))
    plot.main(["--accuracy", str(accuracy), "--isvit", str(older), str(newer), "--out", str(tmp_path / "p.png")])
    assert drawn == {"isvit (fast preset)": {3: 20.0, 4: 73.1, 6: 81.7}}


def test_a_setting_run_with_seeds_is_drawn_at_its_mean(tmp_path, plot):
    path = tmp_path / "isvit_seeds.json"
    rows = {f"fast/w3a3/seed{i}": cli_result("isvit", 3, t, preset="fast") for i, t in enumerate((40.0, 36.0, 38.0))}
    rows["fast/w4a4"] = cli_result("isvit", 4, 74.0, preset="fast")  # one seed: its row
    rows["summary"] = {"fast/w3a3": {"seeds": [0, 1, 2], "top1_mean": 38.0},
                       "fast/w3a3-log2sqrt2": {"seeds": [0, 1, 2], "top1_mean": 26.0},  # an ablation
                       "fast/w4a4": {"seeds": [0], "top1_mean": 74.0}}
    path.write_text(json.dumps(rows))
    assert plot.read_isvit(path) == {"isvit (fast preset)": {3: 38.0, 4: 74.0}}


def test_an_aliased_setting_is_drawn_in_place_of_the_plain_one(tmp_path, plot):
    path = tmp_path / "isvit_seeds.json"
    rows = {"summary": {"fast/w3a3-iters100": {"seeds": [1, 2], "top1_mean": 43.0},  # before the plain one
                        "fast/w3a3": {"seeds": [0, 1, 2], "top1_mean": 38.0},
                        "fast/w4a4-iters100": {"seeds": [0, 1, 2], "top1_mean": 75.0}}}
    rows["fast/w4a4"] = cli_result("isvit", 4, 74.0, preset="fast")  # one seed's row of the plain setting
    path.write_text(json.dumps(rows))
    assert plot.read_isvit(path) == {"isvit (fast preset)": {3: 38.0, 4: 74.0}}
    aliases = {"w3a3-iters100": "w3a3", "w4a4-iters100": "w4a4"}
    assert plot.read_isvit(path, aliases) == {"isvit (fast preset)": {3: 43.0, 4: 75.0}}
