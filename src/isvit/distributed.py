"""torch.distributed for isvit: several processes (``torchrun``, or a user's own process group)
share one evaluation or one calibration.

Nothing here holds state: the process group is torch's (``torch.distributed``), and every helper
below is a no-op (or the identity) when no group of two or more processes is initialised, so the
single-process code path is unchanged.

- ``start_from_env``: join the group that ``torchrun`` describes in its environment variables
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``): NCCL when the
  device is a CUDA GPU, gloo on the CPU, with a timeout on collectives
  (``ISVIT_DIST_TIMEOUT`` seconds, default 1800) so that a rank that dies does not leave the
  others waiting forever.
- ``Shard``: which items of N a rank owns (every ``world``-th, starting at its rank): no item
  twice and none dropped, whatever N.
- Collectives: gradients and a loss summed over the ranks (``sum_gradients``), a module's state
  broadcast from rank 0 (``broadcast_state``), counts summed (``reduce_``), a weighted mean
  (``mean_over_ranks``), Python objects broadcast or gathered, a value that must agree on every rank
  (``check_same``). A collective that fails because another rank died or did not answer within the
  timeout raises ``IsvitError`` with one sentence.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import IsvitError

TIMEOUT_ENV = "ISVIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


# ---------------------------------------------------------------------------------------------
# Where this process stands
# ---------------------------------------------------------------------------------------------

def is_distributed() -> bool:
    """True inside an initialised process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files, logs and progress bars (any process when alone)."""
    return rank() == 0


# ---------------------------------------------------------------------------------------------
# Joining torchrun's process group
# ---------------------------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """True when torchrun (or the same environment variables) started this process as one of two
    or more."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def collective_timeout() -> timedelta:
    """How long a collective waits for the other ranks: ``ISVIT_DIST_TIMEOUT`` seconds (default 1800)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise IsvitError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return timedelta(seconds=seconds)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun a CUDA device without an index is the local rank's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def start_from_env(device: torch.device) -> bool:
    """Join the process group that torchrun's environment describes, if it describes one and none is
    initialised yet; returns whether a group was started here (the caller then ``stop``s it).

    The backend follows the device: NCCL for a CUDA GPU (made this process's current device), gloo
    on the CPU.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise IsvitError("this torch build has no torch.distributed, so it cannot run under torchrun")
    timeout = collective_timeout()
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    except (RuntimeError, ValueError) as exc:  # a missing variable, an unreachable MASTER_ADDR, a timeout
        raise IsvitError(f"cannot join the distributed run ({_first_line(exc)})") from exc
    return True


def stop() -> None:
    """Leave the process group (after ``start_from_env``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _backend_reason(exc: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without the source-file prefix
    (gloo: "[.../pair.cc:545] Read error [127.0.0.1]:13238: Connection reset by peer. This is ...")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(exc))
    return text.split(". ")[0].rstrip(".")


@contextmanager
def _collective():
    """Turn the error of a collective whose peers died or timed out into one sentence."""
    try:
        yield
    except RuntimeError as exc:  # gloo: "Connection reset by peer", "Timed out waiting ...ms"; NCCL likewise
        raise IsvitError(
            "another process of the distributed run stopped or did not answer within the collective timeout "
            f"({TIMEOUT_ENV} under isvit's command line), so this one stops too ({_backend_reason(exc)})"
        ) from exc


def _backend_device() -> torch.device:
    """Where the backend's tensors must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """The items of ``total`` that rank ``rank`` of ``world`` owns: ``rank``, ``rank + world``, ...
    Every item belongs to exactly one rank, whatever ``total``; shard sizes differ by at most one."""

    rank: int
    world: int
    total: int

    @property
    def indices(self) -> range:
        return range(self.rank, self.total, self.world)

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def slice(self) -> slice:
        """This shard of a tensor whose first dimension has ``total`` items (a view)."""
        return slice(self.rank, None, self.world)

    def head(self, count: int) -> slice:
        """The part of this shard (as a slice of the shard) that lies among the first ``count`` items."""
        return slice(0, len(range(self.rank, min(count, self.total), self.world)))

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """The items of ``idx`` (indices into all ``total``) that this shard owns, in order, as
        indices into the shard; ``idx`` itself when the shard is everything."""
        if self.world == 1:
            return idx
        return idx[idx % self.world == self.rank] // self.world


def split(total: int) -> Shard:
    """This process's shard of ``total`` items (all of them outside a process group)."""
    return Shard(rank(), world_size(), total)


def local_part(idx: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """``shard.local(idx)``, or ``idx`` when there is no shard."""
    return idx if shard is None else shard.local(idx)


def shard_loader(loader: Iterable) -> Iterable:
    """This rank's share of an evaluation loader, to be evaluated by it alone.

    A ``DataLoader`` with a batch size becomes one over this rank's shard of its dataset (same batch
    size, workers and collate function; whatever sampler it had, e.g. a padding
    ``DistributedSampler``, is not used: the shard is exact). Any other iterable of batches is
    shared batch by batch: this rank takes every ``world``-th batch.
    """
    if not is_distributed():
        return loader
    if (
        isinstance(loader, torch.utils.data.DataLoader) and loader.batch_size is not None
        and not isinstance(loader.dataset, torch.utils.data.IterableDataset)
    ):
        shard = split(len(loader.dataset))
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(loader.dataset, list(shard.indices)),
            batch_size=loader.batch_size,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
        )
    return itertools.islice(loader, rank(), None, world_size())


# ---------------------------------------------------------------------------------------------
# Collectives (each one the identity outside a process group)
# ---------------------------------------------------------------------------------------------

def _flat_in_place(tensors: list[torch.Tensor], collective) -> None:
    """Run ``collective(flat)`` on the tensors flattened into one buffer per dtype, and copy the
    result back into them."""
    device = _backend_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        with _collective():
            collective(flat)
        offset = 0
        for t in group:
            t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def reduce_(tensors: list[torch.Tensor], op=None) -> None:
    """All-reduce ``tensors`` in place (``op``: a ``torch.distributed.ReduceOp``, default SUM), in
    one collective per dtype."""
    if is_distributed() and tensors:
        _flat_in_place(tensors, lambda flat: dist.all_reduce(flat, op if op is not None else dist.ReduceOp.SUM))


def sum_gradients(optimizer: torch.optim.Optimizer, loss: float) -> float:
    """Sum the gradient of every parameter in ``optimizer``'s param groups over the ranks (in
    place), and ``loss``; returns the summed loss. Each rank weights its part of the batch by its
    share of the batch (its slice size over the batch size) before, so the sum is the gradient of
    the whole batch. A parameter without a gradient on a rank (its slice was empty) counts as zero.
    Outside a process group: nothing to do, ``loss`` is returned as it is."""
    if not is_distributed():
        return loss
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    total = torch.tensor([loss], dtype=torch.float64)
    reduce_([p.grad for p in params] + [total])
    return float(total)


def mean_over_ranks(value: float, weight: float) -> float:
    """The mean of every rank's ``value`` weighted by its ``weight`` (e.g. a loss over ``weight``
    images); the same on every rank. A rank with weight 0 contributes nothing."""
    if not is_distributed():
        return value
    t = torch.tensor([value * weight if weight else 0.0, float(weight)], dtype=torch.float64)
    reduce_([t])
    return float(t[0] / t[1])


def max_over_ranks(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    reduce_([t], dist.ReduceOp.MAX)
    return float(t)


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's value of every tensor in ``module.state_dict()``, on every rank (in place). The
    ranks must hold the same tensors (names and shapes), e.g. after running the same steps."""
    if is_distributed():
        _flat_in_place(list(module.state_dict().values()), lambda flat: dist.broadcast(flat, src=0))


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable object) on every rank."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    with _collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    with _collective():
        dist.all_gather_object(out, obj)
    return out


def check_same(value: str, what: str) -> None:
    """Raise on every rank unless every rank holds the same ``value`` (e.g. a digest of its
    arguments); ``what`` names it in the sentence."""
    values = gather_objects(value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise IsvitError(
            f"the processes of this distributed run were started with different {what} "
            f"(rank {differing[0]}'s differ from rank 0's): start every rank with the same ones"
        )
