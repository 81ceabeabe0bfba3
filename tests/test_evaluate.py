"""Top-1 and top-5 of isvit.evaluate, against values computed by hand."""

import pytest
import torch

import isvit


class FixedLogits(torch.nn.Module):
    """Returns the given logits whatever the images (a parameter so that evaluate finds its device)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, images):
        return self.logits[: len(images)]


def test_top1_and_top5_by_hand():
    # 10 classes, scores 9 (class 0) down to 0 (class 9) for every image, so class k ranks k+1:
    # labels 0 (rank 1), 2 (rank 3), 4 (rank 5), 5 (rank 6), 9 (rank 10)
    logits = torch.arange(9.0, -1.0, -1.0).repeat(5, 1)
    labels = torch.tensor([0, 2, 4, 5, 9])
    result = isvit.evaluate(FixedLogits(logits), [(torch.zeros(5, 3, 4, 4), labels)], progress=False)
    assert result["top1"] == pytest.approx(100 * 1 / 5) and result["top5"] == pytest.approx(100 * 3 / 5)
    assert result["images"] == 5


def test_batches_are_counted_by_image():
    logits = torch.arange(9.0, -1.0, -1.0).repeat(3, 1)
    batches = [(torch.zeros(3, 3, 4, 4), torch.tensor([0, 0, 7])), (torch.zeros(1, 3, 4, 4), torch.tensor([1]))]
    result = isvit.evaluate(FixedLogits(logits), batches, progress=False)
    assert result["top1"] == pytest.approx(50.0) and result["top5"] == pytest.approx(75.0) and result["images"] == 4


def test_top5_of_fewer_than_five_classes_is_every_image():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    result = isvit.evaluate(FixedLogits(logits), [(torch.zeros(2, 3, 4, 4), torch.tensor([2, 2]))], progress=False)
    assert result["top1"] == pytest.approx(50.0) and result["top5"] == pytest.approx(100.0)
