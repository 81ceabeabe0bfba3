"""Top-1 / top-5 accuracy of a model on a labelled loader."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .data import iterate


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Accuracy in percent over every (images, labels) batch of ``loader``.

    Returns ``{"top1", "top5", "images", "eval_seconds"}``. ``device`` defaults to the model's.

    Inside a process group every rank passes the same (whole) loader: each evaluates its own share of
    the images (``distributed.shard_loader``: no image twice, none left out), the counts are summed,
    and every rank returns the same accuracy, that of one process evaluating everything.
    ``eval_seconds`` is then the slowest rank's time.
    """
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    loader = distributed.shard_loader(loader)
    progress = progress and distributed.is_main()
    correct1 = correct5 = seen = 0
    start = time.perf_counter()
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images, labels in iterate(loader):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            seen += labels.numel()
            bar.update(labels.numel())
            bar.set_postfix(top1=f"{100.0 * correct1 / seen:.2f}")
    counts = torch.tensor([correct1, correct5, seen], dtype=torch.int64)
    distributed.reduce_([counts])
    correct1, correct5, seen = counts.tolist()
    if seen == 0:
        raise ValueError("the evaluation loader gave no images")
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "images": seen,
        "eval_seconds": distributed.max_over_ranks(time.perf_counter() - start),
    }
