"""One process of a 2-process gloo group on 127.0.0.1, started by tests/test_distributed.py.

    python tests/distributed_worker.py group OUT INPUTS      (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
    python tests/distributed_worker.py calibrate DIR         (one process: a resumable calibration)

``group`` starts its own process group (as a user's program would) with a short timeout, evaluates
and quantizes, and writes what the tests compare into OUT/rank<r>.pt (one start for both: starting
a process costs seconds). The single-process runs it is compared
with are made by the test itself, from the same functions below. ``calibrate`` runs no group: it
calibrates with ``resume_dir=DIR`` and writes DIR/result.pt.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import isvit
from isvit import distributed
from isvit.checkpoint import load_quantized
from isvit.config import EndToEnd
from isvit.distributed import sum_gradients
from isvit.endtoend import backward_batch, start_training
from isvit.export import load_onnx
from isvit.resume import tensors_digest

from conftest import VIT_TINY_WEIGHTS, method_config, random_images, small_swin, small_vit

EVAL_IMAGES = 13  # neither 2 nor the batch size divides it
CALIB_IMAGES = 11


def eval_data():
    images = random_images(EVAL_IMAGES, seed=3)
    labels = torch.randint(0, 10, (EVAL_IMAGES,), generator=torch.Generator().manual_seed(4))
    return images, labels


def eval_loader():
    images, labels = eval_data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)


def eval_batches():
    images, labels = eval_data()
    return list(zip(images.split(3), labels.split(3)))


def eval_cases(inputs: Path) -> dict:
    """The accuracy of a float, a saved quantized and an exported ONNX model, on a DataLoader and
    on a plain list of batches."""
    quantized, _ = load_quantized(inputs / "small.isvit")
    onnx_model, _ = load_onnx(inputs / "small.onnx", threads=1)
    models = {"float": small_vit(), "quantized": quantized, "onnx": onnx_model}
    out = {}
    for name, model in models.items():
        for kind, data in (("loader", eval_loader()), ("batches", eval_batches())):
            metrics = isvit.evaluate(model, data, device="cpu", progress=False)
            out[f"{name} {kind}"] = {k: metrics[k] for k in ("top1", "top5", "images")}
    return out


def calib_images() -> torch.Tensor:
    return random_images(CALIB_IMAGES, seed=1)


def probe() -> torch.Tensor:
    return random_images(4, seed=2)


def isvit_config(**overrides) -> isvit.IsvitConfig:
    settings = {"method": "isvit", "w_bits": 4, "a_bits": 4, "calib_size": CALIB_IMAGES, "iters": 3,
                "batch_size": 6, "lr": 1e-4, "qdrop": 0.0, "init_size": CALIB_IMAGES}
    return method_config(**{**settings, **overrides})


def real_vit():
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(load_file(str(VIT_TINY_WEIGHTS)))
    return model.eval()


def quantize_cases(inputs: Path | None) -> dict[str, tuple]:
    """name -> (model, calibration images, config, resume folder or None)."""
    cases = {
        "vit isvit": (small_vit, calib_images, isvit_config()),
        "swin isvit": (small_swin, calib_images, isvit_config()),
        "vit isvit qdrop": (small_vit, calib_images, isvit_config(qdrop=0.5)),
        # the end-to-end stage: every rank draws the same batches, its gradients summed over the ranks
        "vit isvit end to end": (small_vit, calib_images, isvit_config(
            end_to_end=EndToEnd(epochs=2, batch_size=6, lr=1e-3, scale_lr=1e-2))),
        # with the rounding offsets and SULQ grids: the same state on every rank (their discrete
        # choices make float-order differences other codes, so one process is compared by gradient)
        "vit isvit end to end rounding and grids": (small_vit, calib_images, isvit_config(
            end_to_end=EndToEnd(epochs=2, batch_size=6, lr=1e-3, scale_lr=1e-2, round_lr=3e-2, softmax_lr=1e-2))),
        "vit isvit end to end augmented": (small_vit, calib_images, isvit_config(  # one view of a batch on both ranks
            end_to_end=EndToEnd(epochs=1, batch_size=6, lr=1e-3, augment=True))),
        "vit isvit end to end holdout": (small_vit, calib_images, isvit_config(  # 3 kept images, 2 on one rank
            end_to_end=EndToEnd(epochs=2, batch_size=6, lr=1e-3, scale_lr=1e-2, holdout=3))),
    }
    if inputs is not None and (inputs / "real_calib.pt").is_file():
        cases["vit-ti repq"] = (real_vit, lambda: torch.load(inputs / "real_calib.pt"),
                                isvit.RepqConfig(w_bits=4, a_bits=4, calib_size=8))
    return cases


def quantize_case(make_model, make_images, config, resume_dir=None) -> tuple[torch.Tensor, str]:
    """(logits on the probe images, digest of the quantized model's state)."""
    qmodel = isvit.quantize(make_model(), make_images(), config, progress=False, resume_dir=resume_dir)
    with torch.no_grad():
        x = probe() if config.method == "isvit" else make_images()[:2]
        logits = qmodel(x)
    return logits, tensors_digest(qmodel.state_dict().items())


def end_to_end_gradients() -> torch.Tensor:
    """The end-to-end stage's gradient of every group it trains (step sizes, floats, rounding
    offsets, SULQ grids) for one batch of all the calibration images, computed by the stage's own
    step (``endtoend.backward_batch``, then the sum over the ranks; one process: all of it)."""
    qmodel, fp = isvit.quantize(small_vit(), calib_images(), isvit_config(), progress=False), small_vit()
    settings = EndToEnd(round_lr=3e-2, softmax_lr=1e-2, micro_batch=4)
    optimizer = torch.optim.Adam(start_training(qmodel, settings))
    images = calib_images()
    shard = distributed.split(len(images))
    local = images[shard.slice]
    with torch.no_grad():
        targets = fp(local)
    loss = backward_batch(qmodel, fp, local, targets, torch.arange(len(images)), shard, settings, device="cpu")
    sum_gradients(optimizer, loss)
    return torch.cat([p.grad.reshape(-1) for group in optimizer.param_groups for p in group["params"]])


def quantize_all(out: Path, inputs: Path | None) -> dict:
    results = {}
    for name, (make_model, make_images, config) in quantize_cases(inputs).items():
        results[name] = quantize_case(make_model, make_images, config)
    # A finished resume folder: run, then the same again, which restores rank 0's saved state.
    resume = out / "resume"
    results["resume first"] = quantize_case(small_vit, calib_images, isvit_config(), resume)
    results["resume again"] = quantize_case(small_vit, calib_images, isvit_config(), resume)
    return results


def resume_config() -> isvit.IsvitConfig:
    """Long enough units (60 steps) to be killed in the middle of one, QDrop on."""
    return isvit_config(iters=60, qdrop=0.5)


def main() -> None:
    task, out = sys.argv[1], Path(sys.argv[2])
    inputs = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    if task == "calibrate":
        torch.save(quantize_case(small_vit, calib_images, resume_config(), resume_dir=out), out / "result.pt")
        return
    if task != "group":
        raise SystemExit(f"unknown task {task}")
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    results = {"eval": eval_cases(inputs), "quantize": quantize_all(out, inputs), "gradients": end_to_end_gradients()}
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
