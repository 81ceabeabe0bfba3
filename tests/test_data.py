"""Tests of isvit.data: preprocessing config, folder layouts, errors, calibration images."""

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torchvision import transforms as T

from isvit.data import (
    ImageFolderDataset,
    build_transform,
    clean_error_message,
    load_calibration_images,
    make_loader,
    resolve_data_config,
)
from isvit.errors import DataError, IsvitError

from conftest import CALIB_DIR, SHARED, VAL_DIR

# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False)


@pytest.fixture(scope="module")
def small_transform():
    """A cheap transform: 32x32 tensors."""
    return T.Compose([T.Resize((32, 32)), T.ToTensor()])


@pytest.fixture
def shared_data():
    if not VAL_DIR.is_dir() or not CALIB_DIR.is_dir():
        pytest.skip(f"real data not found in {SHARED}")
    return SHARED / "data"


def save_image(path: Path, mode: str = "RGB", size=(20, 16), color=0) -> Path:
    """Write a small solid image of ``mode``; the format follows the suffix."""
    if mode == "P":
        image = Image.new("RGB", size, (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        channels = len(mode)
        image = Image.new(mode, size, color if channels == 1 else (color,) * channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_labels(folder: Path, text: str) -> Path:
    path = folder / "labels.txt"
    path.write_text(text)
    return path


def a_real_jpeg() -> Path:
    """Any real JPEG from the shared data, or skip."""
    if not VAL_DIR.is_dir():
        pytest.skip(f"real data not found in {SHARED}")
    return min(VAL_DIR.glob("*.JPEG"))


# --------------------------------------------------------------------------------------
# Preprocessing config and transform
# --------------------------------------------------------------------------------------


def test_vit_tiny_transform_matches_data_md(vit_tiny):
    config = resolve_data_config(vit_tiny)
    assert config["input_size"] == [3, 224, 224]
    assert config["crop_pct"] == pytest.approx(0.9)
    assert config["interpolation"] == "bicubic"
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.5, 0.5, 0.5]

    steps = build_transform(config).transforms
    resize, crop, normalize = steps[0], steps[1], steps[-1]
    assert isinstance(resize, T.Resize)
    assert resize.size == 248
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (224, 224)
    assert isinstance(normalize, T.Normalize)
    assert list(map(float, normalize.mean)) == [0.5] * 3
    assert list(map(float, normalize.std)) == [0.5] * 3

    out = build_transform(config)(Image.new("RGB", (300, 260)))
    assert out.shape == (3, 224, 224)


def test_config_is_json_serialisable(vit_tiny):
    import json

    config = resolve_data_config(vit_tiny)
    assert json.loads(json.dumps(config)) == config


def test_overrides(vit_tiny):
    config = resolve_data_config(
        vit_tiny,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=0.875,
        interpolation="bilinear",
        input_size=192,
    )
    assert config["input_size"] == [3, 192, 192]
    assert config["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert config["std"] == pytest.approx([0.229, 0.224, 0.225])
    steps = build_transform(config).transforms
    assert steps[0].size == int(192 / 0.875)  # 219
    assert steps[0].interpolation == T.InterpolationMode.BILINEAR
    assert tuple(steps[1].size) == (192, 192)
    assert build_transform(config)(Image.new("RGB", (250, 300))).shape == (3, 192, 192)


@pytest.mark.parametrize(
    "override",
    [
        {"crop_pct": 0.0},
        {"crop_pct": 1.5},
        {"interpolation": "cubic-ish"},
        {"mean": (0.5, 0.5)},
        {"std": (0.5, 0.0, 0.5)},
        {"input_size": -3},
    ],
)
def test_bad_overrides(vit_tiny, override):
    with pytest.raises(IsvitError):
        resolve_data_config(vit_tiny, **override)


# --------------------------------------------------------------------------------------
# labels.txt layout
# --------------------------------------------------------------------------------------


@pytest.fixture
def labelled_folder(tmp_path):
    """Images of several modes and formats, listed in labels.txt (tab and space separated)."""
    save_image(tmp_path / "rgb.JPEG", "RGB", color=120)
    save_image(tmp_path / "grey.jpg", "L", color=90)
    save_image(tmp_path / "cmyk.jpeg", "CMYK", color=40)
    save_image(tmp_path / "palette.png", "P")
    save_image(tmp_path / "alpha.png", "RGBA", color=200)
    write_labels(
        tmp_path,
        "rgb.JPEG\t5\n\ngrey.jpg\t0\ncmyk.jpeg  999\npalette.png\t17\n\nalpha.png 3\n\n",
    )
    return tmp_path


def test_labels_layout(labelled_folder, small_transform):
    dataset = ImageFolderDataset(labelled_folder, small_transform)
    names = [Path(p).name for p, _ in dataset.samples]
    assert names == ["rgb.JPEG", "grey.jpg", "cmyk.jpeg", "palette.png", "alpha.png"]
    assert [label for _, label in dataset.samples] == [5, 0, 999, 17, 3]
    assert all(isinstance(p, str) for p, _ in dataset.samples)
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label == dataset.samples[index][1]


def test_without_transform_returns_rgb_pil(labelled_folder):
    dataset = ImageFolderDataset(labelled_folder)
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert isinstance(image, Image.Image) and image.mode == "RGB"


def test_limit(labelled_folder):
    dataset = ImageFolderDataset(labelled_folder, limit=2)
    assert [Path(p).name for p, _ in dataset.samples] == ["rgb.JPEG", "grey.jpg"]
    assert len(ImageFolderDataset(labelled_folder, limit=100)) == 5
    with pytest.raises(IsvitError):
        ImageFolderDataset(labelled_folder, limit=0)


@pytest.mark.parametrize(
    "text, bad_line, words",
    [
        ("a.png\t1\nb.png\n", 2, "fields"),
        ("a.png\t1\t2\n", 1, "fields"),
        ("a.png\t1\n\nb.png\tseven\n", 3, "not an integer"),
        ("a.png\t1000\n", 1, "outside 0..999"),
        ("a.png\t-1\n", 1, "outside 0..999"),
        ("a.png\t1\nmissing.png\t2\n", 2, "does not exist"),
        ("a.png\t1\nb.png\t2\na.png\t3\n", 3, "repeats"),
    ],
)
def test_labels_errors(tmp_path, text, bad_line, words):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    labels = write_labels(tmp_path, text)
    with pytest.raises(DataError) as info:
        ImageFolderDataset(tmp_path)
    message = str(info.value)
    assert str(labels) in message
    assert f"Line {bad_line} " in message
    assert words in message
    assert "\n" not in message


def test_empty_labels_file(tmp_path):
    labels = write_labels(tmp_path, "\n\n")
    with pytest.raises(DataError, match="no images") as info:
        ImageFolderDataset(tmp_path)
    assert str(labels) in str(info.value)


# --------------------------------------------------------------------------------------
# Folder errors
# --------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        ImageFolderDataset(root)
    assert str(root) in str(info.value)


def test_neither_layout(tmp_path):
    save_image(tmp_path / "flat.png")  # a flat folder needs require_labels=False
    (tmp_path / "n01440764").mkdir()  # an empty class folder is no class folder
    with pytest.raises(DataError, match="neither") as info:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError):
        ImageFolderDataset(tmp_path, require_labels=False)


def test_flat_folder_without_labels(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", "d.bmp"]:
        save_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, require_labels=False)
    assert [Path(p).name for p, _ in dataset.samples] == ["a.jpg", "b.PNG", "c.webp", "d.bmp"]
    assert all(label == -1 for _, label in dataset.samples)


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_unreadable_image(tmp_path, kind):
    path = tmp_path / f"{kind}.JPEG"
    if kind == "corrupt":
        path.write_bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
                         .to(torch.uint8).numpy().tobytes())
    else:
        data = a_real_jpeg().read_bytes()
        path.write_bytes(data[: len(data) // 2])
    write_labels(tmp_path, f"{path.name}\t3\n")
    dataset = ImageFolderDataset(tmp_path)  # listing works; reading fails
    with pytest.raises(DataError, match="cannot read image") as info:
        dataset[0]
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------
# ImageNet layout
# --------------------------------------------------------------------------------------


def test_imagenet_layout_with_subset_of_classes(tmp_path, small_transform):
    for wnid in ["n01530575", "n01443537"]:
        save_image(tmp_path / wnid / "y.JPEG", "RGB")
        save_image(tmp_path / wnid / "x.jpeg", "L")
    (tmp_path / "n01440764").mkdir()  # empty class folder: ignored
    (tmp_path / "stray.png").write_bytes(b"")  # files beside class folders: ignored

    wnids = ImageNetInfo().label_names()
    assert wnids.index("n01443537") == 1 and wnids.index("n01530575") == 10

    dataset = ImageFolderDataset(tmp_path, small_transform)
    relative = [(str(Path(p).relative_to(tmp_path)), label) for p, label in dataset.samples]
    assert relative == [
        (str(Path("n01443537/x.jpeg")), 1),
        (str(Path("n01443537/y.JPEG")), 1),
        (str(Path("n01530575/x.jpeg")), 10),
        (str(Path("n01530575/y.JPEG")), 10),
    ]
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and label == 10
    assert len(ImageFolderDataset(tmp_path, limit=3)) == 3


def test_imagenet_layout_rejects_non_wnid_folder(tmp_path):
    save_image(tmp_path / "n01443537" / "a.JPEG")
    save_image(tmp_path / "cats" / "b.JPEG")
    with pytest.raises(DataError, match="WordNet id") as info:
        ImageFolderDataset(tmp_path)
    assert "cats" in str(info.value)


# --------------------------------------------------------------------------------------
# Loader and error messages
# --------------------------------------------------------------------------------------


def test_make_loader(labelled_folder, small_transform):
    dataset = ImageFolderDataset(labelled_folder, small_transform)
    loader = make_loader(dataset, batch_size=2, num_workers=0)
    assert loader.pin_memory is False
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [5, 0]

    def order(seed):
        batches = make_loader(dataset, batch_size=5, num_workers=0, shuffle=True, seed=seed)
        return next(iter(batches))[1].tolist()

    in_file_order = [5, 0, 999, 17, 3]
    assert order(0) == order(0)  # seeded
    assert order(0) != in_file_order and order(1) != in_file_order and order(0) != order(1)  # shuffled
    assert sorted(order(0)) == sorted(in_file_order)


def test_clean_error_message_through_worker(tmp_path, small_transform):
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"this is not a JPEG at all" * 40)
    write_labels(tmp_path, "bad.JPEG\t1\n")
    loader = make_loader(ImageFolderDataset(tmp_path, small_transform), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)
    message = clean_error_message(info.value)
    assert message.startswith(f"cannot read image {bad}: ")
    assert "\n" not in message and "Traceback" not in message
    # An error raised in the main process is returned unchanged.
    assert clean_error_message(DataError("one sentence.")) == "one sentence."


# --------------------------------------------------------------------------------------
# Calibration images
# --------------------------------------------------------------------------------------


def test_load_calibration_images(tmp_path, small_transform):
    for i in range(8):
        save_image(tmp_path / f"img{i}.png", "L", color=i * 30)  # flat folder, no labels

    def calib(num, seed):
        return load_calibration_images(tmp_path, small_transform, num, seed=seed, progress=False)

    def pixel_ids(batch):  # each image is a solid grey level identifying it
        return [round(float(img[0, 0, 0]) * 255 / 30) for img in batch]

    first = calib(4, 0)
    assert first.shape == (4, 3, 32, 32)
    assert torch.equal(first, calib(4, 0))
    assert pixel_ids(first) != pixel_ids(calib(4, 1))
    assert len(set(pixel_ids(first))) == 4

    everything = calib(None, 0)
    assert pixel_ids(everything) == list(range(8))  # all of them, in folder order
    assert torch.equal(calib(100, 5), everything)


# --------------------------------------------------------------------------------------
# Real data in ../shared
# --------------------------------------------------------------------------------------


def read_labels_txt(folder: Path):
    lines = [line.split("\t") for line in (folder / "labels.txt").read_text().splitlines() if line]
    return [(str(folder / name), int(label)) for name, label in lines]


@pytest.mark.real
def test_real_val_folder(shared_data):
    expected = read_labels_txt(VAL_DIR)
    dataset = ImageFolderDataset(VAL_DIR)
    assert len(dataset) == 1300
    assert dataset.samples == expected
    assert ImageFolderDataset(VAL_DIR, limit=200).samples == expected[:200]


@pytest.mark.real
def test_real_greyscale_calibration_image(shared_data, vit_tiny):
    dataset = ImageFolderDataset(CALIB_DIR, build_transform(resolve_data_config(vit_tiny)))
    grey = None
    for index, (path, _) in enumerate(dataset.samples):
        with Image.open(path) as img:
            if img.mode == "L":
                grey = index
                break
    assert grey is not None, "no greyscale image found in the calibration folder"
    image, label = dataset[grey]
    assert image.shape == (3, 224, 224)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert label == dataset.samples[grey][1]
