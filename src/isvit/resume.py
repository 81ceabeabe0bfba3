"""Resumable calibration: the state of a run after each finished step, in one file, written atomically.

A calibration is a sequence of named steps (I&S-ViT: ``calibrate activations``, then one step per
reconstructed unit of stage 1 such as ``stage 1 blocks.3``, the whole ``stage 1``, ``fold and
calibrate weights``, the units of stage 3, ``bias correction``; RepQ-ViT and min-max: one step per
stage). After each one, rank 0 replaces ``DIR/state.pt`` (``torch.save``, written to a temporary
file first and moved onto the name, so a run killed at any moment leaves the previous state whole):

- ``format``: ``isvit-resume-v1``;
- ``identity``: what the run is (``run_identity``): the model (its class and a digest of its
  weights), the config (``config.to_dict()``), the calibration images (shape and digest) and
  the number of processes; a DIR written by another run is refused with one sentence;
- ``done``: the names of the finished steps, in order, and ``results`` (each step's report);
- ``model``: the quantized model's ``state_dict()`` as the last finished step left it;
- ``rng``: every rank's global torch RNG state (CPU, and CUDA where the model runs on a GPU): QDrop
  draws its masks from it, so restoring it makes the rest of the run draw what it would have drawn.

Started again with the same command, a run loads the model state and the RNG states, skips the
finished steps and carries on; inputs that depend on the model so far (stage 3's) are recomputed by
running the finished units. The result is bit-identical to an uninterrupted run's on the same
device with the same threads and processes. Only rank 0 reads and writes DIR; it sends the state to
the other ranks, so DIR needs to be on rank 0's machine only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .errors import IsvitError
from .files import atomic_write

FORMAT = "isvit-resume-v1"
STATE_FILE = "state.pt"


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A digest of named tensors: names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(model: nn.Module, config_dict: dict, images: torch.Tensor) -> dict:
    """What a run is: the float model (class and weights), the config, the calibration images and
    the number of processes. Two runs with the same identity compute the same thing."""
    return {
        "model": f"{type(model).__name__} {tensors_digest(model.state_dict().items())}",
        "config": config_dict,
        "calibration": f"{list(images.shape)} {tensors_digest([('images', images)])}",
        "processes": distributed.world_size(),
    }


def _rng_state(device: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_identity(directory: Path, saved: dict, identity: dict) -> None:
    """Refuse, with one sentence, a state written by another run."""
    if saved["model"] != identity["model"]:
        raise IsvitError(f"{directory} holds the state of a calibration of another model: use another folder, "
                         "or the model that wrote it")
    if saved["calibration"] != identity["calibration"]:
        raise IsvitError(f"{directory} holds the state of a calibration on other calibration images: use another "
                         "folder, or the images (and seed) that wrote it")
    if saved["config"] != identity["config"]:
        keys = sorted(set(saved["config"]) | set(identity["config"]))
        diff = [k for k in keys if saved["config"].get(k) != identity["config"].get(k)]
        changes = ", ".join(f"{k} {saved['config'].get(k)!r} there, {identity['config'].get(k)!r} here" for k in diff[:3])
        raise IsvitError(f"{directory} holds the state of a calibration with another configuration ({changes}): "
                         "use another folder")
    if saved["processes"] != identity["processes"]:
        raise IsvitError(f"{directory} holds the state of a run of {saved['processes']} processes and this one has "
                         f"{identity['processes']}: resume it with {saved['processes']}, or use another folder")


def _read(directory: Path, identity: dict) -> dict | None:
    """The state saved in ``directory`` (None if there is none yet, after creating the folder)."""
    if directory.exists() and not directory.is_dir():
        raise IsvitError(f"resume folder {directory} is a file, not a folder")
    path = directory / STATE_FILE
    if not path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IsvitError(f"cannot create resume folder {directory} ({exc.strerror})") from exc
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors of a damaged file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IsvitError(f"{path} is corrupt or truncated ({detail[:120]}): delete it to start the calibration "
                         "again") from exc
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise IsvitError(f"{path} is not an isvit resume state ({FORMAT}): use another folder")
    fields = {"identity": dict, "done": list, "results": dict, "model": dict, "rng": list}
    if any(not isinstance(saved.get(k), kind) for k, kind in fields.items()) or set(saved["identity"]) != set(identity):
        raise IsvitError(f"{path} is corrupt (an entry is missing or damaged): delete it to start the calibration again")
    _check_identity(directory, saved["identity"], identity)
    return saved


def _read_on_rank0(directory: Path, identity: dict) -> tuple[dict | None, str | None]:
    """Rank 0's (saved state, None) or (None, the sentence that refuses it), on every rank."""
    outcome = None
    if distributed.is_main():
        try:
            outcome = (_read(directory, identity), None)
        except IsvitError as exc:
            outcome = (None, str(exc))
    return distributed.broadcast_object(outcome)


class ResumeState:
    """The finished steps of a calibration run, and the file they are saved to after each one.

    Without a folder (``ResumeState()``) nothing is finished and nothing is saved.
    """

    def __init__(self, directory: Path | None = None, identity: dict | None = None, saved: dict | None = None):
        self.directory = directory
        self.identity = identity
        self.finished = list(saved["done"]) if saved else []
        self.results = dict(saved["results"]) if saved else {}
        self._saved = saved  # model and RNG states, until ``restore``

    @classmethod
    def open(cls, directory: str | Path | None, identity: dict | None) -> ResumeState:
        """The state in ``directory`` (rank 0 reads it and sends it to the others), or a fresh one
        if it holds none yet; refuses a state of another run, or a damaged one, with one sentence."""
        if directory is None:
            return cls()
        directory = Path(directory)
        saved, error = _read_on_rank0(directory, identity)
        if error:
            raise IsvitError(error)
        return cls(directory, identity, saved)

    def done(self, step: str) -> bool:
        return step in self.finished

    def result(self, step: str):
        return self.results.get(step)

    def restore(self, model: nn.Module) -> None:
        """Put the saved model state and this rank's RNG state back (nothing if none was saved)."""
        if self._saved is None:
            return
        try:
            model.load_state_dict(self._saved["model"])
        except RuntimeError as exc:
            raise IsvitError(f"{self.directory / STATE_FILE} does not fit this model ({str(exc).splitlines()[0]})") from exc
        device = next(model.parameters()).device
        _set_rng_state(self._saved["rng"][distributed.rank()], device)
        self._saved = None

    def finish(self, step: str, model: nn.Module, result=None) -> None:
        """Record ``step`` as finished with ``model`` as it now is: rank 0 writes the file atomically."""
        if self.directory is None:
            return
        self.finished.append(step)
        if result is not None:
            self.results[step] = result
        rng = distributed.gather_objects(_rng_state(next(model.parameters()).device))
        if not distributed.is_main():
            return
        state = {
            "format": FORMAT, "identity": self.identity, "done": self.finished, "results": self.results,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "rng": rng,
        }
        atomic_write(self.directory / STATE_FILE, lambda tmp: torch.save(state, tmp))  # IsvitError if it cannot
