"""What every benchmark records beside its numbers (the command, the date, the machine, the
versions), atomic JSON writes, and reruns of the ``isvit`` command line.

The thread count is part of the result, not only of its cost: it changes the order of float sums,
so the rounding, and through block reconstruction the trained model. Benchmarks therefore pin it
(and every seed) explicitly and record it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The shared model and images, relative to the repository root (where every command runs), so that
# a recorded command is the same on every checkout.
SHARED = Path("..") / "shared"
WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.safetensors"
VAL = SHARED / "data" / "imagenet-val-1300"
CALIB = SHARED / "data" / "imagenet-calib-1000"
MODEL = "vit_tiny_patch16_224"


# /proc/cpuinfo flags that decide which integer and low-precision kernels the runtimes can use:
# VNNI (int8 dot products), AVX-512 BF16 and AMX (bf16 and int8 tiles).
KERNEL_FLAGS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU's model name, core count, the vector extensions that change float rounding and
    integer kernels (``vnni``: either VNNI; then each flag of KERNEL_FLAGS), and the load average now."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return {"model": name, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), **{flag: flag in flags for flag in KERNEL_FLAGS},
            "load_average": os.getloadavg()}


def command_line() -> str:
    """How this benchmark was started, as one would type it in the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join([".venv/bin/python", str(shown), *sys.argv[1:]])


def environment(threads: int | list[int]) -> dict:
    import timm
    import torch

    return {"command": command_line(), "date": datetime.date.today().isoformat(), "threads": threads,
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(), "cpu": cpu_info()}


def write_json(path: str | Path, data) -> None:
    """``data`` as JSON at ``path``, written to a temporary file first: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resumable_rows(path: str | None) -> dict[tuple[str, ...], dict]:
    """``--resume-from FILE``: the rows of an earlier output of the same benchmark, by the command
    line that made them. Only a row whose command is exactly the one to run now is reused."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    rows = data.values() if isinstance(data, dict) else data
    return {resume_key(row["command"]): row for row in rows if isinstance(row, dict) and "command" in row}


# Flags of the ``isvit`` command line renamed since rows were recorded with them: a row recorded
# with the old name matches the command with the new one.
RENAMED_FLAGS = {"--no-reparam": "--no-fold"}


def resume_key(args: list[str]) -> tuple[str, ...]:
    """A command line as ``--resume-from`` matches it: without ``--save FILE`` (where the model went
    does not change the row) and with renamed flags under their new names (``RENAMED_FLAGS``)."""
    args = [str(a) for a in args]
    key = []
    for i, arg in enumerate(args):
        if arg == "--save" or (i > 0 and args[i - 1] == "--save"):
            continue
        key.append(RENAMED_FLAGS.get(arg, arg))
    return tuple(key)


def run_cli(args: list[str], resume: dict[tuple[str, ...], dict] | None = None,
            key: tuple[str, ...] | None = None) -> dict:
    """``isvit ARGS --json OUT --quiet`` in a fresh process (so that peak memory is this run's),
    in the repository root; returns its JSON with the command, the date and the CPU added. A row
    of ``resume`` with the same command is returned instead of running it again: the same
    ``resume_key``, or ``key`` where the caller indexed ``resume`` its own way."""
    args = [str(a) for a in args]
    key = resume_key(args) if key is None else key
    if resume and key in resume:
        print("resumed: isvit", shlex.join(args), file=sys.stderr, flush=True)
        return resume[key]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "isvit.cli", *args, "--json", str(out), "--quiet"]
        print("$ isvit", shlex.join(args), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr, cwd=ROOT)
        result = json.loads(out.read_text())
    cpu = {k: v for k, v in cpu_info().items() if k != "load_average"}
    return {**result, "command": args, "date": datetime.date.today().isoformat(), "cpu": cpu}


def first_calib_images(model, count: int, batch_size: int = 32):
    """The first ``count`` images of imagenet-calib-1000 in folder order, preprocessed as ``model``
    expects, as one (count, 3, H, W) tensor (labels ignored)."""
    import torch

    import isvit

    transform = isvit.build_transform(isvit.resolve_data_config(model))
    dataset = isvit.ImageFolderDataset(ROOT / CALIB, transform, require_labels=False)
    subset = torch.utils.data.Subset(dataset, range(count))
    return torch.cat([batch for batch, _ in isvit.make_loader(subset, batch_size=batch_size)])


def untrained_isvit(model, config, images, stage1=None):
    """A wrapped copy of ``model`` quantized as ``isvit`` has it before stage 3, with no training:
    activation grids fitted on ``images``, the fold of the post-LayerNorm grids (unless
    ``config.fold`` is off), weight grids. For the benchmarks that look at one block alone
    (recon_speed.py, unit_probe.py, bit_groups.py --per-block), whose full-precision targets come
    from ``model`` itself: a config that rotates is refused (its blocks would work in another basis).
    ``stage1(qmodel)``, if given, runs where stage 1 does: after the activation grids, before the
    fold, with the weight quantizers off."""
    import copy

    from isvit.pipeline import (
        calibrate_activations,
        calibrate_weights,
        fold_post_layernorm,
        set_quantizers,
    )
    from isvit.wrap import wrap_model

    if config.wants_rotation():
        raise SystemExit("this benchmark compares blocks with the unrotated model: add rotate=False to its settings")
    qmodel = wrap_model(copy.deepcopy(model), config.placement())
    set_quantizers(qmodel, False, "weight")
    calibrate_activations(qmodel, images)
    if stage1 is not None:
        stage1(qmodel)
    if config.fold:
        fold_post_layernorm(qmodel)
    set_quantizers(qmodel, True, "weight")
    calibrate_weights(qmodel)
    return qmodel
