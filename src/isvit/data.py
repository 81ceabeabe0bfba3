"""Image data: preprocessing config, image-folder datasets, loaders and calibration images.

Two folder layouts are read (see ``shared/docs/data.md``):

* a folder with ``labels.txt`` (one ``FILENAME<TAB>CLASS_INDEX`` per line), and
* the standard ImageNet layout ``root/<wnid>/*.JPEG``, labelled with the index of the
  WordNet id in the standard 1000-class order (n01440764 = 0), even when only some
  class folders are present.

Calibration images are unlabelled, so for them a flat folder of images is accepted too.
Every bad input raises :class:`isvit.errors.DataError` (or :class:`IsvitError` for bad
options) with one sentence naming the offending file.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import timm.data
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .errors import DataError, IsvitError

__all__ = [
    "ImageFolderDataset",
    "build_transform",
    "clean_error_message",
    "load_calibration_images",
    "make_loader",
    "resolve_data_config",
]

#: Interpolation names timm's transforms understand.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

#: File suffixes (lower case) treated as images in folder layouts without labels.txt.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp", ".bmp")

#: Name of the labels file of the labels.txt layout.
LABELS_FILE = "labels.txt"

#: Number of ImageNet-1k classes.
NUM_CLASSES = 1000

#: Keys of a data config that are passed on to ``timm.data.create_transform``.
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


# --------------------------------------------------------------------------------------
# Preprocessing config and transform
# --------------------------------------------------------------------------------------


def resolve_data_config(
    model,
    *,
    mean=None,
    std=None,
    crop_pct=None,
    interpolation=None,
    input_size=None,
    base=None,
) -> dict:
    """Return the model's preprocessing config, with any given override applied.

    The base is ``base`` when given (e.g. the preprocessing saved with a quantized model), else
    timm's ``resolve_data_config({}, model=model)`` (the model's pretrained config).
    ``input_size`` may be an int image side (giving ``(3, s, s)``) or a ``(3, H, W)`` sequence;
    ``mean`` and ``std`` are 3 floats each.

    Returns a plain JSON-serialisable dict with keys ``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct`` and ``crop_mode`` (sequences as lists).
    Raises :class:`IsvitError` for an invalid value.
    """
    config = dict(base) if base is not None else dict(timm.data.resolve_data_config({}, model=model))
    missing = [k for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k not in config]
    if missing:
        raise IsvitError(f"the preprocessing config lacks {', '.join(missing)}.")
    if mean is not None:
        config["mean"] = _three_floats("mean", mean)
    if std is not None:
        config["std"] = _three_floats("std", std)
        if any(s <= 0 for s in config["std"]):
            raise IsvitError(f"std must be positive, got {std!r}.")
    if crop_pct is not None:
        config["crop_pct"] = crop_pct
    if interpolation is not None:
        config["interpolation"] = interpolation
    if input_size is not None:
        config["input_size"] = _input_size(input_size)

    pct = config.get("crop_pct")
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
        raise IsvitError(f"crop_pct must be a number in (0, 1], got {pct!r}.")
    if config.get("interpolation") not in INTERPOLATIONS:
        raise IsvitError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
            f"got {config.get('interpolation')!r}."
        )

    return {
        "input_size": [int(v) for v in config["input_size"]],
        "interpolation": str(config["interpolation"]),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": str(config.get("crop_mode") or "center"),
    }


def _three_floats(name: str, value) -> list[float]:
    """Validate ``value`` as a sequence of 3 numbers and return it as floats."""
    try:
        floats = [float(v) for v in value]
    except (TypeError, ValueError):
        raise IsvitError(f"{name} must be 3 numbers, got {value!r}.") from None
    if len(floats) != 3:
        raise IsvitError(f"{name} must be 3 numbers, got {value!r}.")
    return floats


def _input_size(value) -> list[int]:
    """Turn an int image side or a (3, H, W) sequence into a [3, H, W] list."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = [3, value, value]
    else:
        try:
            size = [int(v) for v in value]
        except (TypeError, ValueError):
            raise IsvitError(f"input_size must be an int or (3, H, W), got {value!r}.") from None
    if len(size) != 3 or size[0] != 3 or min(size) <= 0:
        raise IsvitError(f"input_size must be a positive int or (3, H, W), got {value!r}.")
    return size


def build_transform(data_config: dict):
    """Return timm's evaluation transform (resize, center crop, to tensor, normalize)."""
    kwargs = {key: data_config[key] for key in _TRANSFORM_KEYS if key in data_config}
    for key in ("input_size", "mean", "std"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return timm.data.create_transform(**kwargs, is_training=False)


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """Images of a folder with their ImageNet-1k class index.

    Layouts, detected in this order:

    1. ``root/labels.txt`` exists: its ``FILENAME<TAB>CLASS_INDEX`` lines (any whitespace
       separator is accepted when a line has no tab; blank lines are skipped), in file order.
    2. Subfolders of ``root`` contain images: ``root/<wnid>/<image>``, labelled with the
       wnid's index in the standard 1000-class order, sorted by wnid then file name.
    3. Only with ``require_labels=False``: the images directly in ``root``, sorted by name,
       each labelled ``-1``.

    Attributes:
        samples: list of ``(path, label)`` pairs.

    ``__getitem__`` returns ``(transform(rgb_pil_image), label)``, or the PIL image itself
    when ``transform`` is None.
    """

    def __init__(self, root, transform=None, limit=None, *, require_labels=True):
        self.root = Path(root)
        self.transform = transform
        if not self.root.exists():
            raise DataError(f"Image folder {self.root} does not exist.")
        if not self.root.is_dir():
            raise DataError(f"Image folder {self.root} is not a folder.")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise IsvitError(f"limit must be a positive integer, got {limit!r}.")

        labels_path = self.root / LABELS_FILE
        if labels_path.is_file():
            samples = _read_labels_file(labels_path)
        else:
            samples = _read_class_folders(self.root)
            if not samples and not require_labels:
                samples = [(str(p), -1) for p in _image_files(self.root)]
            if not samples:
                what = "" if require_labels else ", nor images directly in it"
                raise DataError(
                    f"Image folder {self.root} has neither a {LABELS_FILE} "
                    f"nor class subfolders (<wnid>/*.JPEG) with images{what}."
                )
        self.samples: list[tuple[str, int]] = samples[:limit] if limit else samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = read_rgb_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def read_rgb_image(path) -> Image.Image:
    """Open and fully decode an image as RGB; raise DataError if it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so corrupt or truncated files fail here
            if img.mode == "P":
                img = img.convert("RGBA")  # palette transparency needs RGBA first
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not a known image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _read_labels_file(labels_path: Path) -> list[tuple[str, int]]:
    """Parse ``labels.txt`` into (path, label) pairs, checking every line."""
    try:
        text = labels_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {labels_path}: {exc}") from None

    samples = []
    seen = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        where = f"Line {number} of {labels_path}"
        if len(fields) != 2 or not all(fields):
            raise DataError(
                f"{where} has {len(fields)} fields, expected FILENAME<TAB>CLASS_INDEX: {line!r}."
            )
        name, index_text = fields
        try:
            label = int(index_text)
        except ValueError:
            raise DataError(f"{where} has a class index that is not an integer: {index_text!r}.") from None
        if not 0 <= label < NUM_CLASSES:
            raise DataError(f"{where} has class index {label}, outside 0..{NUM_CLASSES - 1}.")
        if name in seen:
            raise DataError(f"{where} repeats file {name!r}, already listed on line {seen[name]}.")
        seen[name] = number
        path = labels_path.parent / name
        if not path.is_file():
            raise DataError(f"{where} names file {path}, which does not exist.")
        samples.append((str(path), label))

    if not samples:
        raise DataError(f"Labels file {labels_path} lists no images.")
    return samples


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _read_class_folders(root: Path) -> list[tuple[str, int]]:
    """Samples of the ImageNet layout ``root/<wnid>/<image>``; empty if there are none.

    Labels are the standard ImageNet-1k indices, whichever class folders are present.
    Hidden folders and folders without images are ignored.
    """
    class_index = {wnid: i for i, wnid in enumerate(timm.data.ImageNetInfo().label_names())}
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _image_files(folder)
        if not images:
            continue
        if folder.name not in class_index:
            raise DataError(
                f"Class folder {folder} is not named after an ImageNet-1k WordNet id "
                f"(like n01440764)."
            )
        samples.extend((str(p), class_index[folder.name]) for p in images)
    return samples


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _default_num_workers() -> int:
    return min(2, os.cpu_count() or 1)


def make_loader(dataset, batch_size=64, num_workers=None, shuffle=False, seed=0) -> DataLoader:
    """A DataLoader over ``dataset``; shuffling, when asked for, is seeded by ``seed``.

    ``num_workers`` defaults to ``min(2, os.cpu_count())``.
    """
    if num_workers is None:
        num_workers = _default_num_workers()
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=False,
        generator=generator,
    )


def iterate(loader):
    """``iter(loader)``, with Ctrl-C held back while a DataLoader starts its worker processes.

    A SIGINT (Ctrl-C reaches the workers too) that lands inside the DataLoader's iterator set-up
    leaves it half built: its ``__del__`` then prints a traceback, and at times the process hangs
    on exit waiting for the workers. Held back, the interrupt is raised once the iterator is
    complete, which shuts its workers down properly; the workers, started with the holding handler,
    leave Ctrl-C to the main process.
    """
    workers = isinstance(loader, DataLoader) and loader.num_workers > 0
    previous = signal.getsignal(signal.SIGINT)
    if not workers or threading.current_thread() is not threading.main_thread() or previous is None:
        return iter(loader)
    interrupted = []
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        batches = iter(loader)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        del batches  # its workers are shut down here
        raise KeyboardInterrupt
    return batches


def clean_error_message(exc: BaseException) -> str:
    """The original one-sentence message of an error, without a worker's traceback.

    DataLoader workers re-raise errors with a message holding the whole traceback, whose
    last line reads ``module.ErrorType: message``; this returns just ``message``.
    """
    text = str(exc)
    if "Traceback" not in text:
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else text
    type_name = type(exc).__name__
    for prefix in (f"{type(exc).__module__}.{type_name}: ", f"{type_name}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def load_calibration_images(root, transform, num_images, seed=0, progress=True) -> torch.Tensor:
    """Decode a random subset of ``num_images`` images of ``root`` into an (N, 3, H, W) tensor.

    The subset is drawn with a ``torch.Generator`` seeded by ``seed``, so it is the same for
    the same seed. With ``num_images`` None or at least the number of images, all images are
    used, in folder order. Labels are ignored, so a flat folder of images works too.
    """
    dataset = ImageFolderDataset(root, transform, require_labels=False)
    if num_images is not None and (
        isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1
    ):
        raise IsvitError(f"num_images must be a positive integer, got {num_images!r}.")
    if num_images is not None and num_images < len(dataset):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:num_images].tolist()
        dataset = Subset(dataset, indices)

    batches = []
    with tqdm(total=len(dataset), desc="calibration images", unit="img", disable=not progress) as bar:
        for images, _ in iterate(make_loader(dataset, batch_size=32)):
            batches.append(images)
            bar.update(len(images))
    return torch.cat(batches)
