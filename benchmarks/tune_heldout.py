"""Choose I&S-ViT's hyperparameters on held-out calibration images, never on the evaluation set.

    python benchmarks/tune_heldout.py --set preset=fast,iters=30 --set preset=fast,iters=30,loss=token

imagenet-calib-1000 has labels: a seeded split gives the calibration images (default 640) and a
held-out set (the other 360) on which each setting is scored by top-1, top-1 agreement with the
full-precision model and the mean KL divergence from it (less noisy than top-1 on 360 images).
Each ``--set`` is a comma-separated list of config fields (method=isvit, w_bits=4 and a_bits=4
unless given): for isvit those of ``IsvitConfig`` and of its ``Reconstruction``, applied to the
preset's (``IsvitConfig.from_preset``, e.g. ``preset=fast,iters=30,qdrop=0.5,fold=False``), and
``e2e_``-prefixed fields of its end-to-end stage (``EndToEnd``: ``e2e_epochs=0`` turns it off); for
repq and minmax those of ``RepqConfig`` and ``MinmaxConfig``. The names of isvit's earlier
QuantConfig, ``drop_prob`` and ``reparameterize`` (in the commands of results/tune_heldout.jsonl),
are read as ``qdrop`` and ``fold``. Compare settings run by one invocation: ``--baseline`` (default
``preset=fast`` at the bits of the first ``--set``) is run first, with the same code, so every
comparison has its same-code baseline beside it (``--no-baseline`` skips it). Prints one JSON line
per setting and appends it to --out; each line records the resolved config (``config.to_dict()``), the split, the
threads, the torch version, the date and ``--note`` (what the run is for, and whether the machine
was shared), so no line is edited by hand. ``--calib-flips`` adds each calibration image's left-right mirror
image to the calibration set (twice the images for the same training steps; the held-out images
are not mirrored).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import isvit
from isvit.config import CONFIGS, RENAMED, Config, IsvitConfig
from isvit.data import ImageFolderDataset, make_loader

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def parse_setting(text: str) -> dict:
    """The fields of one ``--set``, with the defaults above; an earlier name (``RENAMED``: drop_prob,
    reparameterize) becomes its new one."""
    fields = {"method": "isvit", "w_bits": 4, "a_bits": 4}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        key = RENAMED.get(key, key)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        if value in ("True", "False"):
            value = value == "True"
        fields[key] = value
    return fields


def config_of(fields: dict) -> Config:
    """The method's config from ``parse_setting``'s fields: for isvit, the preset's (default
    "paper", as ``IsvitConfig``'s) with the other fields, of ``IsvitConfig`` or ``Reconstruction``,
    and ``e2e_``-prefixed ones of the preset's end-to-end stage at those bits (``e2e_epochs=0``: off)."""
    fields = dict(fields)
    method = fields.pop("method")
    if method == "isvit":
        e2e = {k[len("e2e_"):]: fields.pop(k) for k in list(fields) if k.startswith("e2e_")}
        config = IsvitConfig.from_preset(fields.pop("preset", "paper"), **fields)
        if e2e:
            config = dataclasses.replace(config, end_to_end=dataclasses.replace(config.resolved().end_to_end, **e2e))
        return config
    if method not in CONFIGS:
        raise SystemExit(f"unknown method {method!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[method](**fields)


@torch.no_grad()
def logits_of(model, images, batch_size=100):
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def heldout_scores(qmodel, held, labels, fp_logits) -> dict:
    """``qmodel``'s held-out top-1, top-1 agreement with full precision and mean KL divergence from it."""
    logits = logits_of(qmodel, held)
    pred = logits.argmax(1)
    kl = F.kl_div(logits.log_softmax(1), fp_logits.log_softmax(1), log_target=True, reduction="batchmean")
    return {"top1": round(100 * (pred == labels).float().mean().item(), 2),
            "agree": round(100 * (pred == fp_logits.argmax(1)).float().mean().item(), 2), "kl": round(kl.item(), 4)}


def heldout_split(model, cache: str, calib_size: int = 640, seed: int = 123):
    """imagenet-calib-1000 preprocessed for ``model`` (decoded once, kept in ``cache``), split by
    ``seed`` into ``calib_size`` calibration images and the held-out rest: ((images, labels), (images, labels))."""
    if Path(cache).exists():
        images, labels = torch.load(cache)
    else:
        transform = isvit.build_transform(isvit.resolve_data_config(model))
        dataset = ImageFolderDataset(SHARED / "data" / "imagenet-calib-1000", transform)
        batches = list(make_loader(dataset, batch_size=50))
        images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        torch.save((images, labels), cache)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    calib, held = order[:calib_size], order[calib_size:]
    return (images[calib], labels[calib]), (images[held], labels[held])


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the held-out split (``heldout_split``) and of the run, shared with the studies."""
    parser.add_argument("--calib-size", type=int, default=640)
    parser.add_argument("--split-seed", type=int, default=123)
    parser.add_argument("--cache", default="/tmp/isvit_calib1000.pt", help="decoded images are kept here")
    parser.add_argument("--note", default="", help="what the runs are for, and whether the machine was shared")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def open_split(args: argparse.Namespace):
    """What the held-out scripts start from, with ``add_split_arguments``' options: torch's threads
    set, the shared ViT-Ti, the split (``heldout_split``) and the full-precision logits of the
    held-out images: (model, (calibration images, labels), (held-out images, labels), the logits)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = isvit.create_model("vit_tiny_patch16_224", SHARED / "models" / "vit_tiny_patch16_224.safetensors")
    calib, (held, labels) = heldout_split(model, args.cache, args.calib_size, args.split_seed)
    return model, calib, (held, labels), logits_of(model, held)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], dest="settings")
    parser.add_argument("--out", default="results/tune_heldout.jsonl")
    add_split_arguments(parser)
    parser.add_argument("--baseline", help="the setting to compare against (default: preset=fast at the first --set's bits)")
    parser.add_argument("--no-baseline", action="store_true", help="run the --set settings only")
    parser.add_argument("--save-dir", type=Path, help="also write each quantized model there (integer checkpoint)")
    parser.add_argument("--calib-flips", action="store_true",
                        help="calibrate on the calibration images and their left-right mirror images (twice as many)")
    args = parser.parse_args()
    settings = list(args.settings)
    if not args.no_baseline and settings:
        first = parse_setting(settings[0])
        baseline = args.baseline or f"preset=fast,w_bits={first['w_bits']},a_bits={first['a_bits']}"
        if baseline not in settings:
            settings.insert(0, baseline)

    model, (calib, _), (held, held_labels), fp_logits = open_split(args)
    split = f"{len(calib)} calibration / {len(held)} held-out images of imagenet-calib-1000 (split seed {args.split_seed})"
    if args.calib_flips:  # the mirror images are extra calibration images; the held-out ones stay as they are
        calib = torch.cat([calib, calib.flip(-1)])
        split += ", the calibration images also mirrored left-right"
    fp_pred = fp_logits.argmax(1)
    print(f"full precision: held-out top-1 {100 * (fp_pred == held_labels).float().mean():.2f} on {len(held)} images")
    for text in settings:
        fields = parse_setting(text)
        config = config_of(fields)
        start = time.perf_counter()
        qmodel = isvit.quantize(model, calib, config, progress=False)
        seconds = time.perf_counter() - start
        if args.save_dir:
            from isvit.checkpoint import save_quantized

            name = text.replace("=", "-").replace(",", "_") or "default"
            save_quantized(qmodel, args.save_dir / f"{name}.safetensors", model_name="vit_tiny_patch16_224",
                           config=config, data_config=isvit.resolve_data_config(model))
        row = {
            "setting": text,
            **heldout_scores(qmodel, held, held_labels, fp_logits),
            "seconds": round(seconds, 1),
            "baseline": not args.no_baseline and text == settings[0] and text not in args.settings,
            "note": args.note,
            "split": split,
            "config": config.to_dict(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
