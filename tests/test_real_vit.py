"""The real ImageNet ViT-Ti on the first 200 images of imagenet-val-1300 (needs ../shared).

Full precision must match plain timm exactly; W8/A8 (min-max and RepQ-ViT) must stay within 1.5
points of it. ~1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import timm.data
import torch
from PIL import Image

import isvit

from conftest import VAL_BATCH, VAL_DIR, VAL_IMAGES

pytestmark = pytest.mark.real

W8A8_TOLERANCE = 1.5  # points of top-1, on 200 images (one image is 0.5 points)


@pytest.fixture(scope="module")
def fp_top1(real_vit, val_loader):
    """isvit.evaluate of the full-precision model through isvit's own loader."""
    result = isvit.evaluate(real_vit, val_loader, progress=False)
    assert result["images"] == VAL_IMAGES
    return result["top1"]


@torch.inference_mode()
def plain_timm_top1(model, folder, limit: int, batch_size: int) -> float:
    """Top-1 with nothing of isvit: timm's data config and transform, PIL, labels.txt read here."""
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)  # evaluation transform
    lines = [line.split("\t") for line in (folder / "labels.txt").read_text().splitlines() if line.strip()]
    samples = [(folder / name, int(label)) for name, label in lines[:limit]]
    model.eval()
    correct = 0
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        images = []
        for path, _ in batch:
            with Image.open(path) as img:
                images.append(transform(img.convert("RGB")))
        labels = torch.tensor([label for _, label in batch])
        correct += (model(torch.stack(images)).argmax(dim=1) == labels).sum().item()
    return 100.0 * correct / len(samples)


def test_full_precision_matches_plain_timm(real_vit, fp_top1):
    plain = plain_timm_top1(real_vit, VAL_DIR, VAL_IMAGES, VAL_BATCH)
    assert abs(fp_top1 - plain) < 1e-9
    assert 80 < fp_top1 < 85
    assert fp_top1 == pytest.approx(82.5)  # 165 of 200


@pytest.mark.parametrize("method", ["minmax", "repq"])
def test_w8a8_stays_close_to_full_precision(real_vit, real_w8a8, val_batches, fp_top1, method):
    quantized, config = real_w8a8(method)
    assert config.calib_size == 32
    # quantize copied the model: the shared full-precision model has no quantizer
    assert not isvit.quantizers(real_vit)
    assert len(isvit.quantizers(quantized)) == 147
    assert all(q.is_calibrated and q.enabled for _, q in isvit.quantizers(quantized))
    with torch.inference_mode():
        images = val_batches[0][0][:4]
        assert (quantized(images) - real_vit(images)).abs().max() > 1e-2  # it really is quantized
    top1 = isvit.evaluate(quantized, val_batches, progress=False)["top1"]
    assert abs(top1 - fp_top1) <= W8A8_TOLERANCE, f"{method} W8/A8 top-1 {top1} vs full precision {fp_top1}"
