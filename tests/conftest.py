"""Shared fixtures: where ../shared is, small random models, and the real ViT-Ti with its data.

Also the one place for what several test modules use (``random_images``, ``unit_data``,
``calibrated``, ``agreement``, ...): a test module imports from here, from ``family_examples`` or
from ``export_examples``, never from another test module.

The real model and data live in ``../shared`` beside the repository (CI clones the repository
elsewhere with ``shared/`` beside it); tests that need them are skipped when it is absent.
Real-data fixtures are session-scoped: the model is loaded once and the 200 validation images and
32 calibration images are decoded once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIT_TINY_WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.safetensors"
VAL_DIR = SHARED / "data" / "imagenet-val-1300"
CALIB_DIR = SHARED / "data" / "imagenet-calib-1000"

# The tests that load OpenVINO (test_openvino.py, test_openvino_ir.py, and those marked ``openvino``)
# can run in a process of their own: ``--openvino only`` runs just them, ``--openvino without``
# everything else (the two files are then not even imported). scripts/test.sh runs the two parts
# one after the other: with OpenVINO's CPU plugin (its own TBB threads and oneDNN) loaded beside
# torch's, later, unrelated tests crashed the process (segfault, AMD EPYC with AVX2; not seen on an
# AVX-512 Xeon).
OPENVINO_PARTS = ("with", "without", "only")
OPENVINO_FILES = ("test_openvino.py", "test_openvino_ir.py")


def pytest_addoption(parser):
    parser.addoption("--openvino", choices=OPENVINO_PARTS, default="with",
                     help="the tests that load OpenVINO: with the rest (default), left out, or only them")


def pytest_ignore_collect(collection_path, config):
    if config.getoption("--openvino") == "without" and collection_path.name in OPENVINO_FILES:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    part = config.getoption("--openvino")
    if part == "with":
        return
    wanted = part == "only"
    keep = [item for item in items if is_openvino_test(item) == wanted]
    config.hook.pytest_deselected(items=[item for item in items if is_openvino_test(item) != wanted])
    items[:] = keep


def is_openvino_test(item) -> bool:
    return item.path.name in OPENVINO_FILES or item.get_closest_marker("openvino") is not None


VAL_IMAGES = 200
VAL_BATCH = 50
CALIB_IMAGES = 32


def require_shared() -> None:
    """Skip the calling test when the real model or data are not beside the repository."""
    missing = [p for p in (VIT_TINY_WEIGHTS, VAL_DIR / "labels.txt", CALIB_DIR) if not p.exists()]
    if missing:
        pytest.skip(f"real model/data not found in {SHARED} (missing {missing[0].name})")


# The small random models of the unit tests: timm architecture and its arguments (lists, not
# tuples, so that they survive a JSON round trip through a checkpoint's metadata).
SMALL_VIT = ("vit_tiny_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10})
# 64 pixels: 16x16 then 8x8 tokens, windows of 4, shifted blocks.
SMALL_SWIN = ("swin_tiny_patch4_window7_224",
              {"embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4], "img_size": 64, "window_size": 4, "num_classes": 10})


def _small(spec, seed: int, overrides: dict) -> torch.nn.Module:
    name, args = spec
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**args, **overrides}).eval()


def small_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised 2-block ViT-Ti on 64x64 images (16 patches + cls), in eval mode."""
    return _small(SMALL_VIT, seed, overrides)


def small_swin(seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised 2-stage Swin (2 + 2 blocks) on 64x64 images, in eval mode."""
    return _small(SMALL_SWIN, seed, overrides)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on ``n`` threads for the block, its previous count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def umask(mask: int):
    """The process's umask set to ``mask`` for the block (files created inside get 0666 & ~mask)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Eight random 64x64 PNG images with labels 0..9 (labels.txt): a data or calibration folder."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    lines = []
    for i in range(8):
        Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png\t{i % 10}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")
    return folder


# timm's own test architectures: tiny, registered under a name (so the CLI can build them) and
# randomly initialised; weights are written to a file so that no download is ever attempted.
TINY_VIT = "test_vit"  # a VisionTransformer: 6 blocks of width 64 on 160x160 images, 0.4 M parameters
TINY_RESNET = "test_resnet"  # a ResNet, which isvit cannot quantize


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """``tiny_weights(name)``: a safetensors file of the randomly initialised timm model ``name``."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")

    def get(name: str) -> Path:
        path = folder / f"{name}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            save_file(timm.create_model(name, pretrained=False).state_dict(), str(path))
        return path

    return get


@pytest.fixture
def timm_builds(monkeypatch):
    """Records the ``pretrained`` flag of every timm.create_model call; a download fails the test."""
    calls, create = [], timm.create_model

    def recording(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        assert not pretrained, "a download was attempted"
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    return calls
def error_of(capsys, argv) -> str:
    """Runs ``isvit`` with ``argv``, which must fail with exit status 2 and one sentence on stderr
    (no traceback); returns that sentence."""
    from isvit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("isvit: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def random_images(n: int, size: int | tuple[int, int] = 64, seed: int = 1) -> torch.Tensor:
    """``n`` random (3, h, w) images (``size`` is h = w or (h, w)), seeded by their own generator:
    the one image helper of the tests, so that a test's data depends on its arguments only."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def method_config(method: str = "repq", **fields):
    """The config of ``method`` with ``fields`` (None values left out: the method's defaults); for
    isvit ``IsvitConfig.from_preset``, so that the reconstruction's fields can be given flat."""
    from isvit.config import CONFIGS, IsvitConfig

    fields = {k: v for k, v in fields.items() if v is not None}
    if method == "isvit":
        return IsvitConfig.from_preset(**fields)
    return CONFIGS[method](**fields)


def activations_quantized(model, x, bits=4):
    """Stage-1 starting point: wrapped, activation quantizers calibrated, weights full precision."""
    import copy

    from isvit.config import IsvitConfig
    from isvit.pipeline import calibrate_activations, set_quantizers
    from isvit.wrap import wrap_model

    fp = copy.deepcopy(model)
    q = wrap_model(model, IsvitConfig(w_bits=bits, a_bits=bits).placement())
    set_quantizers(q, False, "weight")
    calibrate_activations(q, x)
    return fp, q


def unit_data(fp, q, x, index, sequential=False):
    """Inputs (full-precision or quantized-so-far) and full-precision targets of unit ``index``."""
    from isvit.reconstruct import run_unit
    from isvit.wrap import forward_units

    fp_units, q_units = forward_units(fp), forward_units(q)
    x_fp = x_q = x
    for i in range(index):
        x_fp = run_unit(fp_units[i], x_fp, "cpu", 64, torch.float32, "cpu")
        x_q = run_unit(q_units[i], x_q, "cpu", 64, torch.float32, "cpu")
    y = run_unit(fp_units[index], x_fp, "cpu", 64, torch.float32, "cpu")
    return q_units[index], (x_q if sequential else x_fp), y


def spread_layernorms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the post-LayerNorm channels very different ranges and offsets, as trained ViTs have
    (random LayerNorms are all gamma=1, beta=0): per-channel scales and zero points then differ a lot."""
    from isvit.wrap import post_layernorm_pairs

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, norm, _ in post_layernorm_pairs(model):
            c = norm.weight.numel()
            norm.weight.mul_(torch.exp(torch.randn(c, generator=g)))
            norm.bias.add_(torch.randn(c, generator=g) * 2)


def calibrated(model: torch.nn.Module, size: int = 64) -> torch.nn.Module:
    """``model`` wrapped at W4/A4 with per-channel post-LayerNorm quantizers, its LayerNorms spread
    (``spread_layernorms``), and calibrated on 16 random images."""
    from isvit.pipeline import calibrate_activations, calibrate_weights
    from isvit.wrap import Placement, wrap_model

    wrap_model(model, Placement(w_bits=4, a_bits=4, softmax_quantizer="log2sqrt2", post_ln_per_channel=True))
    spread_layernorms(model)
    calibrate_weights(model)
    calibrate_activations(model, random_images(16, size, seed=1))
    return model


@torch.no_grad()
def logits(model, x, kind: str) -> torch.Tensor:
    """Logits with 'none', 'activation' or 'all' quantizers enabled."""
    import isvit

    isvit.set_quantizers(model, False)
    if kind != "none":
        isvit.set_quantizers(model, True, kind)
    return model(x)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of equal argmax."""
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def truncated(source: Path, target: Path) -> Path:
    """The first half of file ``source`` written to ``target``: a damaged file of any format."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require_shared()
    return SHARED


@pytest.fixture(scope="session")
def real_vit(shared_dir):
    """The real ImageNet ViT-Ti, loaded with plain timm + safetensors (strict), eval mode.

    Session-scoped and shared: tests must not modify it (``isvit.quantize`` copies by default).
    """
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(str(VIT_TINY_WEIGHTS)), strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def real_transform(real_vit):
    import isvit

    return isvit.build_transform(isvit.resolve_data_config(real_vit))


@pytest.fixture(scope="session")
def val_loader(real_transform):
    """isvit's loader over the first 200 images of imagenet-val-1300, batch 50."""
    import isvit

    dataset = isvit.ImageFolderDataset(VAL_DIR, real_transform, limit=VAL_IMAGES)
    return isvit.make_loader(dataset, batch_size=VAL_BATCH)


@pytest.fixture(scope="session")
def val_batches(val_loader):
    """The same 200 images decoded once: a list of (images, labels) batches of 50.

    ``isvit.evaluate`` takes any iterable of (images, labels), so repeated evaluations need not
    decode the JPEGs again.
    """
    batches = [(images.clone(), labels.clone()) for images, labels in val_loader]
    assert sum(len(labels) for _, labels in batches) == VAL_IMAGES
    return batches


@pytest.fixture(scope="session")
def calib32(real_transform) -> torch.Tensor:
    """32 calibration images of imagenet-calib-1000 (the seeded random subset, seed 0)."""
    import isvit

    images = isvit.load_calibration_images(CALIB_DIR, real_transform, CALIB_IMAGES, seed=0, progress=False)
    assert images.shape == (CALIB_IMAGES, 3, 224, 224)
    return images


@pytest.fixture(scope="session")
def real_w8a8(real_vit, calib32):
    """``real_w8a8(method, outlier_ratio=None)``: the real ViT-Ti quantized at W8/A8 by ``method``
    on ``calib32``, once per session and setting (shared by the accuracy and the ONNX tests):
    (model, config). Tests must not modify it."""
    import isvit

    cache = {}

    def get(method: str, outlier_ratio: float | None = None):
        if (method, outlier_ratio) not in cache:
            config = method_config(method=method, w_bits=8, a_bits=8, outlier_ratio=outlier_ratio)
            cache[method, outlier_ratio] = (isvit.quantize(real_vit, calib32, config, progress=False), config)
        return cache[method, outlier_ratio]

    return get


@pytest.fixture(scope="session")
def real_exported(real_vit, calib32, tmp_path_factory):
    """``real_exported(w_bits, a_bits)``: the real ViT-Ti quantized by isvit's fast preset with one
    iteration a unit on ``calib32`` (so every option of the preset at those bits: at W4 the
    rotation, the outlier grid and learnt rounding offsets, SULQ always) and exported to ONNX,
    once per session and setting: (model, config, path). Tests must not modify them."""
    import isvit
    from isvit.export import export_onnx

    cache = {}
    folder = tmp_path_factory.mktemp("real_onnx")

    def get(w_bits: int, a_bits: int):
        if (w_bits, a_bits) not in cache:
            config = isvit.IsvitConfig.from_preset(preset="fast", w_bits=w_bits, a_bits=a_bits, iters=1,
                                       calib_size=CALIB_IMAGES)
            model = isvit.quantize(real_vit, calib32, config, progress=False)
            path = folder / f"vit_tiny_w{w_bits}a{a_bits}.onnx"
            export_onnx(model, path, model_name="vit_tiny_patch16_224", config=config,
                        data_config=isvit.resolve_data_config(real_vit))
            cache[w_bits, a_bits] = (model, config, path)
        return cache[w_bits, a_bits]

    return get


# ---------------------------------------------------------------------------------------------
# Observing what the pipeline does, on the model's state
# ---------------------------------------------------------------------------------------------

def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical state dicts: the same keys, each tensor equal in shape, dtype and every value."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class TrainingRecorder:
    """Records every training call of the block reconstruction (``reconstruct_unit`` as the
    pipeline calls it): ``calls`` is a list of dicts with the stage ("stage 1": full-precision
    inputs, "stage 3": the quantized model's own), the unit's name, the dtype and device of its
    cached inputs, whether its weights were quantized, and its ``body``'s state just before and
    just after training."""

    def __init__(self, monkeypatch):
        from isvit import pipeline
        from isvit.quantizers import named_quantizers

        self.calls: list[dict] = []
        self._stage = None
        blocks, train = pipeline.reconstruct_blocks, pipeline.reconstruct_unit

        def recorded_blocks(*args, sequential, **kwargs):
            self._stage = "stage 3" if sequential else "stage 1"
            return blocks(*args, sequential=sequential, **kwargs)

        def recorded(unit, inputs, targets, settings, device, **kwargs):
            weights = [q.enabled for _, q in named_quantizers(unit, "weight")]
            call = {"stage": self._stage, "unit": unit.name, "inputs_dtype": inputs.dtype,
                    "inputs_device": inputs.device, "weights_quantized": bool(weights) and all(weights),
                    "before": state_copy(unit.body)}
            losses = train(unit, inputs, targets, settings, device, **kwargs)
            call["after"] = state_copy(unit.body)
            self.calls.append(call)
            return losses

        monkeypatch.setattr(pipeline, "reconstruct_blocks", recorded_blocks)
        monkeypatch.setattr(pipeline, "reconstruct_unit", recorded)

    def units(self, stage: str) -> list[str]:
        """The units trained in ``stage``, in order."""
        return [c["unit"] for c in self.calls if c["stage"] == stage]


@pytest.fixture
def training(monkeypatch) -> TrainingRecorder:
    return TrainingRecorder(monkeypatch)


@pytest.fixture
def quantized_by_cli(monkeypatch) -> list:
    """What ``isvit quantize`` (``isvit.cli.main``) quantized: a list that gets one (config,
    quantized model) pair per call of ``isvit.quantize`` by the command line."""
    from isvit import cli

    found = []
    quantize = cli.quantize

    def recorded(model, calib, config, **kwargs):
        qmodel = quantize(model, calib, config, **kwargs)
        found.append((config, qmodel))
        return qmodel

    monkeypatch.setattr(cli, "quantize", recorded)
    return found
