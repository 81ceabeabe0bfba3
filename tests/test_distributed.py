"""Several processes (torch.distributed, gloo on 127.0.0.1, 2 ranks) and resumable calibration.

Tests that start processes bound them twice: a short collective timeout (60 s in the worker,
``ISVIT_DIST_TIMEOUT`` for the CLI) and a timeout on the subprocesses themselves. The processes run
one thread each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

import isvit
from isvit.checkpoint import save_quantized
from isvit.distributed import Shard
from isvit.errors import IsvitError
from isvit.export import export_onnx
from isvit.resume import STATE_FILE, tensors_digest

from conftest import CALIB_DIR, SMALL_VIT, VAL_DIR, VIT_TINY_WEIGHTS, require_shared, small_vit, torch_threads

WORKER = Path(__file__).with_name("distributed_worker.py")
PROCESS_TIMEOUT = 300  # seconds a started process may take at most (the machine may be busy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int, world: int = 2, **extra) -> dict:
    """The environment torchrun gives rank ``rank``, on this machine only, one thread each."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra}


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = PROCESS_TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"a process ran past {timeout} s: {err[-2000:]}")
    return proc.returncode, out, err


def run_ranks(per_rank_args: list[list[str]], **extra_env) -> list[tuple[int, str, str]]:
    """Start one process per argument list as the ranks of one group; wait for all of them."""
    port = free_port()
    procs = [start(args, rank_env(r, port, len(per_rank_args), **extra_env)) for r, args in enumerate(per_rank_args)]
    return [finish(p) for p in procs]


@pytest.fixture
def one_thread():
    """This process on one thread, like the ranks, so that its runs compute bit for bit what theirs do."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def worker_inputs(tmp_path_factory) -> Path:
    """A small ViT quantized by min-max, saved as an integer checkpoint and exported to ONNX, and
    8 real calibration images when ../shared is there."""
    folder = tmp_path_factory.mktemp("inputs")
    config = isvit.MinmaxConfig(w_bits=8, a_bits=8, calib_size=8)
    qmodel = isvit.quantize(small_vit(), worker.calib_images(), config, progress=False)
    data_config = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
                   "crop_pct": 1.0, "crop_mode": "center"}
    name, args = SMALL_VIT
    save_quantized(qmodel, folder / "small.isvit", model_name=name, config=config, data_config=data_config, model_args=args)
    export_onnx(qmodel, folder / "small.onnx", model_name=name, config=config, data_config=data_config, model_args=args)
    if VIT_TINY_WEIGHTS.is_file() and CALIB_DIR.is_dir():
        transform = isvit.build_transform(isvit.resolve_data_config(worker.real_vit()))
        torch.save(isvit.load_calibration_images(CALIB_DIR, transform, 8, progress=False), folder / "real_calib.pt")
    return folder


@pytest.fixture(scope="module")
def worker_results(worker_inputs, tmp_path_factory) -> list[dict]:
    """What each of 2 ranks of ``distributed_worker.py group`` evaluated and quantized."""
    out = tmp_path_factory.mktemp("ranks")
    args = [str(WORKER), "group", str(out), str(worker_inputs)]
    for code, _, err in run_ranks([args, args]):
        assert code == 0, err[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_hold_every_item_once_whatever_the_count(world):
    for total in range(23):
        shards = [Shard(r, world, total) for r in range(world)]
        items = sorted(i for s in shards for i in s.indices)
        assert items == list(range(total))
        assert max(s.size for s in shards) - min(s.size for s in shards) <= 1
        data = torch.arange(total)
        idx = torch.randint(max(total, 1), (17,)) if total else torch.zeros(0, dtype=torch.long)
        for s in shards:
            assert data[s.slice].tolist() == list(s.indices)
            assert data[s.slice][s.local(idx)].tolist() == [i for i in idx.tolist() if i % world == s.rank]
            for count in (0, 3, total, total + 4):
                assert data[s.slice][s.head(count)].tolist() == [i for i in s.indices if i < count]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def test_evaluate_in_a_process_group_equals_one_process(worker_inputs, worker_results):
    """Float, quantized and ONNX models, on a DataLoader and on a list of batches: 13 images
    shared by 2 ranks give every rank the counts of one process evaluating all 13."""
    single = worker.eval_cases(worker_inputs)
    for case, metrics in single.items():
        assert metrics["images"] == worker.EVAL_IMAGES
        assert worker_results[0]["eval"][case] == worker_results[1]["eval"][case] == metrics, case


@pytest.mark.real
def test_torchrun_eval_of_the_real_vit_equals_one_process(tmp_path):
    require_shared()
    model = isvit.create_model("vit_tiny_patch16_224", VIT_TINY_WEIGHTS)
    transform = isvit.build_transform(isvit.resolve_data_config(model))
    loader = isvit.make_loader(isvit.ImageFolderDataset(VAL_DIR, transform, limit=25), batch_size=8, num_workers=0)
    single = isvit.evaluate(model, loader, progress=False)
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "isvit", "eval", "--model", "vit_tiny_patch16_224", "--weights", str(VIT_TINY_WEIGHTS),
           "--data", str(VAL_DIR), "--limit", "25", "--batch-size", "8", "--workers", "0", "--device", "cpu",
           "--quiet", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ISVIT_DIST_TIMEOUT": "120"}
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["top1"], result["top5"], result["images"]) == (single["top1"], single["top5"], 25)
    assert result["processes"] == 2 and len(result["peak_rss_mb_per_rank"]) == 2
    assert done.stdout.count("vit_tiny_patch16_224") == 1  # one table: rank 0's


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------

def test_quantize_in_a_process_group_matches_one_process(worker_inputs, worker_results, one_thread):
    """isvit on a small ViT and Swin (11 images over 2 ranks, batches of 6) and repq on 8 real
    images: every rank ends with the same state, and its logits are one process's within float
    tolerance. With QDrop the masks are each rank's own draws, and the end-to-end stage's rounding
    offsets and SULQ grids turn float-order differences into other codes: same state on the ranks
    only (their summed gradients are compared with one process's below)."""
    ranks = [r["quantize"] for r in worker_results]
    for name, (make_model, make_images, config) in worker.quantize_cases(worker_inputs).items():
        (logits0, digest0), (logits1, digest1) = ranks[0][name], ranks[1][name]
        assert digest0 == digest1, name
        assert torch.equal(logits0, logits1), name
        resolved = config.resolved() if isinstance(config, isvit.IsvitConfig) else None
        if resolved is None or not (resolved.reconstruction.qdrop == 0.5 or resolved.end_to_end.round_lr
                                    or resolved.end_to_end.softmax_lr):
            logits, _ = worker.quantize_case(make_model, make_images, config)
            torch.testing.assert_close(logits0, logits, rtol=1e-4, atol=1e-5, msg=name)
    # A finished resume folder gives back, on every rank, the model its run ended with.
    assert ranks[0]["resume again"][1] == ranks[1]["resume again"][1]
    assert ranks[0]["resume again"][1] == ranks[0]["resume first"][1] == ranks[0]["vit isvit"][1]


def test_the_end_to_end_stages_gradients_summed_over_ranks_are_one_process_gradients(worker_results, one_thread):
    """Step sizes, floats, rounding offsets and SULQ grids: each rank's gradient of its share of a
    batch, summed over the ranks, is the gradient one process computes on the whole batch."""
    summed = [r["gradients"] for r in worker_results]
    assert torch.equal(summed[0], summed[1])
    single = worker.end_to_end_gradients()
    assert summed[0].shape == single.shape and single.abs().max() > 0
    torch.testing.assert_close(summed[0], single, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------

def saved_steps(folder: Path) -> list[str]:
    try:
        return torch.load(folder / STATE_FILE, weights_only=True)["done"]
    except (FileNotFoundError, RuntimeError, EOFError):  # not there yet
        return []


def run_until(args: list[str], folder: Path, step: str) -> list[str]:
    """Start the calibration, SIGKILL it as soon as ``step`` is saved; returns the steps saved by then."""
    proc = start(args, {**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while step not in saved_steps(folder):
        assert proc.poll() is None, f"the run ended before {step}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{step} was not saved within {PROCESS_TIMEOUT} s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return saved_steps(folder)


def test_a_killed_calibration_resumes_to_the_model_of_an_uninterrupted_run(tmp_path, one_thread):
    """SIGKILL during stage 3 (with QDrop on, so the RNG state matters, and inputs that depend on
    the units already trained), then the same command: the model is bit for bit the uninterrupted
    run's."""
    folder = tmp_path / "resume"
    args = [str(WORKER), "calibrate", str(folder)]
    saved = run_until(args, folder, "stage 3 patch_embed")
    assert "stage 3" not in saved  # cut short
    code, _, err = finish(start(args, {**os.environ, "OMP_NUM_THREADS": "1"}))
    assert code == 0, err[-3000:]
    resumed = torch.load(folder / "result.pt", weights_only=False)
    uninterrupted = worker.quantize_case(small_vit, worker.calib_images, worker.resume_config())
    assert resumed[1] == uninterrupted[1]
    assert torch.equal(resumed[0], uninterrupted[0])


def test_resume_refuses_another_run_or_a_damaged_state_in_one_sentence(tmp_path):
    folder = tmp_path / "state"
    x = worker.calib_images()
    config = isvit.MinmaxConfig(w_bits=4, a_bits=4, calib_size=8)
    first = isvit.quantize(small_vit(), x, config, progress=False, resume_dir=folder)
    again = isvit.quantize(small_vit(), x, config, progress=False, resume_dir=folder)  # every step done: restored
    assert tensors_digest(first.state_dict().items()) == tensors_digest(again.state_dict().items())
    refusals = {
        "another configuration (w_bits 4 there, 8 here)": (small_vit(), x, isvit.MinmaxConfig(w_bits=8, a_bits=4, calib_size=8)),
        "another model": (small_vit(seed=1), x, config),
        "other calibration images": (small_vit(), x + 1, config),
    }
    for message, (model, images, cfg) in refusals.items():
        with pytest.raises(IsvitError, match=re.escape(message)):
            isvit.quantize(model, images, cfg, progress=False, resume_dir=folder)
    (folder / STATE_FILE).write_bytes((folder / STATE_FILE).read_bytes()[:1000])
    with pytest.raises(IsvitError, match="is corrupt or truncated"):
        isvit.quantize(small_vit(), x, config, progress=False, resume_dir=folder)
    torch.save({"format": "something else"}, folder / STATE_FILE)
    with pytest.raises(IsvitError, match="is not an isvit resume state"):
        isvit.quantize(small_vit(), x, config, progress=False, resume_dir=folder)
    with pytest.raises(IsvitError, match="is a file, not a folder"):
        isvit.quantize(small_vit(), x, config, progress=False, resume_dir=folder / STATE_FILE)


# ---------------------------------------------------------------------------------------------
# Bad situations
# ---------------------------------------------------------------------------------------------

def one_sentence(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("isvit: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_ranks_started_with_different_arguments_are_refused():
    base = ["-m", "isvit", "eval", "--model", "vit_tiny_patch16_224", "--data", "nowhere", "--quiet", "--limit"]
    for code, _, err in run_ranks([base + ["4"], base + ["5"]], ISVIT_DIST_TIMEOUT="60"):
        assert code == 2
        assert "were started with different arguments (rank 1's differ from rank 0's)" in one_sentence(err)


def test_an_output_rank_0_cannot_write_is_refused_on_every_rank():
    """Rank 0 alone writes files, so it alone checks them; its sentence ends every rank (exit 2)."""
    argv = ["-m", "isvit", "eval", "--model", "vit_tiny_patch16_224", "--data", "nowhere", "--quiet",
            "--json", "/proc/isvit-test/r.json"]
    for code, _, err in run_ranks([argv, argv], ISVIT_DIST_TIMEOUT="60"):
        assert code == 2
        assert "cannot write --json /proc/isvit-test/r.json: no file can be created in /proc" in one_sentence(err)


@pytest.mark.real
def test_a_rank_that_dies_stops_the_other_with_one_sentence_and_no_output(tmp_path):
    require_shared()
    folder, out, saved = tmp_path / "state", tmp_path / "out.json", tmp_path / "model.isvit"
    args = ["-m", "isvit", "quantize", "--model", "vit_tiny_patch16_224", "--weights", str(VIT_TINY_WEIGHTS),
            "--calib", str(CALIB_DIR), "--data", str(VAL_DIR), "--limit", "4", "--no-fp", "--quiet",
            "--method", "isvit", "--w-bits", "4", "--a-bits", "4", "--calib-size", "4", "--iters", "200",
            "--recon-batch-size", "4", "--device", "cpu", "--resume", str(folder), "--json", str(out), "--save", str(saved)]
    port, timeout = free_port(), 20
    ranks = [start(args, rank_env(r, port, ISVIT_DIST_TIMEOUT=str(timeout))) for r in range(2)]
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not saved_steps(folder):  # rank 0 saved the calibrated quantizers: reconstruction has begun
        assert ranks[0].poll() is None, ranks[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = finish(ranks[0], timeout=timeout + 60)
    ranks[1].communicate()
    assert code == 2 and time.monotonic() - killed < timeout + 60
    assert "another process of the distributed run stopped or did not answer" in one_sentence(err)
    assert not out.exists() and not saved.exists()
