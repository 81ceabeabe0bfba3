"""The benchmarks' bookkeeping (benchmarks/record.py): a row is reused only when asked for and only
for the very command that made it; outputs are never half written."""

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
