"""The end-to-end stage (endtoend.py): the whole quantized model trained towards the full-precision
outputs after block reconstruction. It lowers the loss on images it did not train on, trains what it
says (step sizes, biases, norms; quantized weights stay on their codes), resumes bit for bit after a
run is stopped between its epochs, and is off unless asked for. Its process-group run (gradients
summed over the ranks) is checked with the block stage's in test_distributed.py."""

import copy
import dataclasses
import itertools
import json

import pytest
import torch

import isvit
from isvit import cli
from isvit.checkpoint import load_quantized, save_quantized
from isvit.config import PRESETS, EndToEnd, IsvitConfig
from isvit.endtoend import (
    augment,
    evaluate_loss,
    finish_training,
    loss_of,
    output_loss,
    start_training,
    train_end_to_end,
    trainable,
)
from isvit.pipeline import applied_config
from isvit.quantizers import SULQuantizer, named_quantizers
from isvit.resume import ResumeState

from conftest import CALIB_DIR, SMALL_VIT, VIT_TINY_WEIGHTS, error_of, random_images, small_vit

needs_shared = pytest.mark.skipif(not VIT_TINY_WEIGHTS.is_file(), reason="../shared is not present")


def confident_vit():
    """The small ViT with its parameters redrawn around timm's initialisation and a head 10x larger:
    outputs far from uniform (logits' std about 2.7), so that the KL to them measures something."""
    model = small_vit()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator) * p.std().clamp_min(0.02))
        model.head.weight.mul_(10)
    return model


def block_quantized(calib, bits=3, **fields):
    """``confident_vit`` after I&S-ViT's block stages (a short schedule, in float32 on every CPU), and
    its float original."""
    config = IsvitConfig.from_preset("fast", w_bits=bits, a_bits=bits, calib_size=len(calib), iters=4, batch_size=8,
                                     rotate=False, end_to_end=EndToEnd(), **{"compute_dtype": "float32", **fields})
    return isvit.quantize(confident_vit(), calib, config, progress=False), confident_vit()


def test_output_losses_are_zero_for_equal_outputs_and_positive_otherwise():
    target = torch.randn(4, 10)
    assert torch.allclose(output_loss(target, target, "kl"), torch.zeros(4), atol=1e-6)
    assert (output_loss(target + torch.randn(4, 10), target, "kl") > 0).all()
    tokens = torch.randn(3, 5, 8)
    assert torch.equal(output_loss(tokens, tokens, "mse"), torch.zeros(3))
    assert output_loss(2 * tokens, tokens, "mse").shape == (3,)


def test_the_auto_loss_is_kl_for_a_classifier_and_mse_for_a_feature_tower():
    assert EndToEnd().loss == "auto"
    assert loss_of(small_vit(), "auto") == "kl" and loss_of(small_vit(num_classes=0), "auto") == "mse"
    assert loss_of(small_vit(num_classes=0), "kl") == "kl"  # what the caller names stands
    # the config recorded with the quantized model names the loss the stage took
    config = IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=4, iters=1, batch_size=4, rotate=False,
                                     end_to_end=EndToEnd(epochs=1, batch_size=4))
    tower = isvit.quantize(small_vit(num_classes=0), random_images(4), config, progress=False)
    assert applied_config(tower, config).end_to_end.loss == "mse"


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_the_stage_lowers_the_kl_on_held_out_images_and_keeps_the_weight_codes(compute):
    # 64 images: on 32 the stage fits them at the held-out images' expense with 2 threads' rounding
    calib, held_out = random_images(64, seed=1), random_images(64, seed=7)
    qmodel, fp = block_quantized(calib)
    before = evaluate_loss(qmodel, fp, held_out, "cpu")
    layers = {name: m for name, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")}
    codes = {name: m.weight_quantizer.codes(m.weight) for name, m in layers.items()}
    weights = {name: m.weight.detach().clone() for name, m in layers.items()}
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, out: seen.add(out.dtype)) for m in layers.values()]
    losses = train_end_to_end(qmodel, fp, calib, EndToEnd(epochs=4, batch_size=8, compute_dtype=compute), device="cpu",
                              progress=False)
    for hook in hooks:
        hook.remove()
    assert seen == {getattr(torch, compute)}  # the quantized model's matrix products ran in that dtype
    after = evaluate_loss(qmodel, fp, held_out, "cpu")
    assert list(losses) == [f"end to end epoch {e}" for e in range(1, 5)] and all(len(v) == 8 for v in losses.values())
    # float32: 0.68 -> 0.52 with 1 thread, 0.74 -> 0.57 with 2 (W3/A3); bfloat16: 0.68 -> 0.62 with 1
    # thread (this small model's logits are about as large as bf16's rounding error on them)
    assert after < (0.9 if compute == "float32" else 0.95) * before, (before, after)
    # the quantized weights kept their values; their codes move only as their step sizes do (a few at most)
    assert all(torch.equal(m.weight, weights[name]) for name, m in layers.items())
    moved = sum((m.weight_quantizer.codes(m.weight) != codes[name]).sum().item() for name, m in layers.items())
    assert moved < 0.05 * sum(c.numel() for c in codes.values())
    # nothing learnable is left behind: the step sizes are folded into the scales
    assert not any("log_scale_step" in k for k in qmodel.state_dict())


def test_after_repq_the_stage_from_python_lowers_the_held_out_kl():
    """The command line keeps repq the published method; from Python the stage trains a repq model's
    step sizes and float parameters as it does an isvit model's (W3/A3: 0.97 -> 0.83 with 2 threads)."""
    calib, held_out = random_images(64, seed=1), random_images(64, seed=7)
    qmodel = isvit.quantize(confident_vit(), calib, isvit.RepqConfig(w_bits=3, a_bits=3, calib_size=64), progress=False)
    fp = confident_vit()
    before = evaluate_loss(qmodel, fp, held_out, "cpu")
    train_end_to_end(qmodel, fp, calib, EndToEnd(epochs=4, batch_size=8, compute_dtype="float32"), device="cpu",
                     progress=False)
    assert evaluate_loss(qmodel, fp, held_out, "cpu") < 0.92 * before


def test_a_model_after_the_stage_saves_and_reloads_to_the_same_outputs(tmp_path):
    # the fast preset at 3 bits, its end-to-end stage included: the learnt step sizes are what is saved
    calib = random_images(16, seed=1)
    config = IsvitConfig.from_preset("fast", w_bits=3, a_bits=3, calib_size=16, iters=2, batch_size=8, rotate=False,
                                     compute_dtype="float32")
    assert config.resolved().end_to_end.epochs == 2
    qmodel = isvit.quantize(small_vit(), calib, config, progress=False)
    path = tmp_path / "e2e.safetensors"
    save_quantized(qmodel, path, model_name=SMALL_VIT[0], config=config, data_config={}, model_args=SMALL_VIT[1])
    rebuilt, info = load_quantized(path)
    recorded = info["config"].end_to_end  # as the stage ran: the loss "auto" took "kl" for a classifier
    assert (recorded.epochs, recorded.loss) == (2, "kl")
    with torch.no_grad():
        assert torch.equal(rebuilt(calib), qmodel(calib))


def test_trained_with_the_rounding_and_the_softmax_grids_it_lowers_the_held_out_kl():
    calib, held_out = random_images(64, seed=1), random_images(64, seed=7)
    qmodel, fp = block_quantized(calib)
    before = evaluate_loss(qmodel, fp, held_out, "cpu")
    sulq = [q for _, q in named_quantizers(qmodel) if isinstance(q, SULQuantizer)]
    grids = [torch.cat([q.eta, q.ymin, q.ymax]) for q in sulq]
    keys = set(qmodel.state_dict())
    train_end_to_end(qmodel, fp, calib, EndToEnd(epochs=2, batch_size=8, round_lr=3e-2, softmax_lr=3e-2),
                     device="cpu", progress=False)
    after = evaluate_loss(qmodel, fp, held_out, "cpu")
    # 0.68 -> 0.49 with 1 thread, 0.74 -> 0.62 with 2 (step sizes and floats alone: 0.57, 0.53)
    assert after < 0.9 * before, (before, after)
    assert set(qmodel.state_dict()) == keys  # offsets and grids folded in; nothing learnable left behind
    assert all(not torch.equal(torch.cat([q.eta, q.ymin, q.ymax]), g) for q, g in zip(sulq, grids, strict=True))


def test_the_rounding_offsets_move_a_code_at_most_one_step_an_epoch_and_stay_on_the_grid():
    calib = random_images(32, seed=1)
    qmodel, fp = block_quantized(calib)
    layers = {name: m for name, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")}
    codes = {name: m.weight_quantizer.codes(m.weight) for name, m in layers.items()}
    # a learning rate far too large: Adam's steps take most offsets past half a code (the model gets worse)
    train_end_to_end(qmodel, fp, calib, EndToEnd(epochs=1, batch_size=8, round_lr=0.3, scale_lr=0.0, lr=0.0),
                     device="cpu", progress=False)
    moved = 0
    for name, m in layers.items():
        q = m.weight_quantizer
        assert torch.equal(q(m.weight), m.weight)  # written on its grid
        shift = q.codes(m.weight) - codes[name]
        assert shift.abs().max() <= 1
        moved += (shift != 0).sum().item()
    assert moved > 0.1 * sum(c.numel() for c in codes.values())


def test_the_stages_leave_no_gradient_buffers_behind():
    calib = random_images(16, seed=1)
    config = IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=16, iters=2, batch_size=8, rotate=False)
    for end_to_end in (EndToEnd(), EndToEnd(epochs=1, batch_size=8, round_lr=3e-2, softmax_lr=1e-2)):
        qmodel = isvit.quantize(small_vit(), calib, dataclasses.replace(config, end_to_end=end_to_end), progress=False)
        assert all(p.grad is None for p in qmodel.parameters())


def test_a_holdout_stops_at_the_first_epoch_that_raised_its_loss_and_undoes_that_epoch():
    calib = random_images(40, seed=1)
    qmodel, fp = block_quantized(calib)
    blocks = copy.deepcopy(qmodel.state_dict())
    # learning rates far too large: the first epoch makes the model worse on the 8 kept images
    report = train_end_to_end(qmodel, fp, calib, EndToEnd(epochs=3, batch_size=8, lr=0.3, scale_lr=1.0, holdout=8),
                              device="cpu", progress=False)
    assert list(report) == ["end to end epoch 1", "end to end held-out"]
    assert len(report["end to end epoch 1"]) == 4  # 32 images trained on, in batches of 8: not the kept ones
    before, after = report["end to end held-out"]
    assert after > before
    assert all(torch.equal(v, blocks[k]) for k, v in qmodel.state_dict().items())  # the epoch undone
    # the preset's learning rates: it runs while each epoch lowers the kept images' loss, ends at the lowest
    qmodel, fp = block_quantized(calib)
    report = train_end_to_end(qmodel, fp, calib, EndToEnd(epochs=3, batch_size=8, holdout=8), device="cpu",
                              progress=False)
    held = report.pop("end to end held-out")
    assert len(held) == len(report) + 1 and min(held) < held[0]
    assert all(b < a for a, b in itertools.pairwise(held[:-1]))  # no epoch but the last may have raised it
    assert evaluate_loss(qmodel, fp, calib[-8:], "cpu") == pytest.approx(min(held), rel=1e-5)


def test_quantize_keeps_the_held_out_images_from_the_block_stages_too():
    calib = random_images(12, seed=1)
    fields = {"w_bits": 4, "a_bits": 4, "iters": 2, "batch_size": 4, "rotate": False}
    with_holdout, without = {}, {}
    isvit.quantize(small_vit(), calib, IsvitConfig.from_preset(
        "fast", calib_size=12, end_to_end=EndToEnd(epochs=1, batch_size=4, holdout=4), **fields),
        progress=False, losses=with_holdout)
    # the block stages of a run on the first 8 images alone: the same losses, unit for unit
    isvit.quantize(small_vit(), calib[:8], IsvitConfig.from_preset("fast", calib_size=8, **fields), progress=False,
                   losses=without)
    for stage in ("stage1", "stage3"):
        assert with_holdout[stage] == without[stage]
    assert len(with_holdout["end_to_end"]["end to end held-out"]) == 2


def test_a_holdout_that_leaves_no_image_to_train_on_is_refused_in_one_sentence():
    qmodel, fp = block_quantized(random_images(8, seed=1))
    with pytest.raises(isvit.IsvitError, match="holdout \\(8 images\\) leaves none of the 8 calibration images"):
        train_end_to_end(qmodel, fp, random_images(8, seed=1), EndToEnd(epochs=1, holdout=8), device="cpu",
                         progress=False)
    config = IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=8, iters=1, rotate=False,
                                     end_to_end=EndToEnd(epochs=1, holdout=8))
    with pytest.raises(isvit.IsvitError, match="holdout \\(8 images\\) leaves none"):  # before the block stages
        isvit.quantize(small_vit(), random_images(8, seed=1), config, progress=False)
    with pytest.raises(isvit.IsvitError, match="holdout must be a whole number"):
        EndToEnd(holdout=-1)


def test_it_trains_step_sizes_and_the_float_parameters_but_not_the_quantized_weights():
    qmodel, _ = block_quantized(random_images(8, seed=1))
    scales, floats = trainable(qmodel)
    quantized = {id(m.weight) for m in qmodel.modules() if hasattr(m, "weight_quantizer")}
    uniform = [q for _, q in named_quantizers(qmodel) if type(q).__name__ == "UniformQuantizer"]
    assert len(scales) == len([q for q in uniform if not (q.outlier_ratio > 0 and q.is_per_channel)]) > 0
    assert not quantized & {id(p) for p in floats}
    names = {name for name, p in qmodel.named_parameters() if any(p is f for f in floats)}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.bias", "head.bias"} <= names
    # the rounding offsets and the SULQ grids join only with a learning rate of their own
    assert [g["lr"] for g in start_training(qmodel, EndToEnd(lr=1e-4, scale_lr=1e-3))] == [1e-3, 1e-4]
    finish_training(qmodel)
    groups = start_training(qmodel, EndToEnd(lr=1e-4, scale_lr=1e-3, round_lr=3e-2, softmax_lr=1e-2))
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 3e-2, 1e-2]
    assert len(groups[2]["params"]) == len(quantized) and all(p.shape == (2,) for p in groups[3]["params"])
    assert len(groups[3]["params"]) == sum(isinstance(q, SULQuantizer) for _, q in named_quantizers(qmodel)) > 0
    finish_training(qmodel)
    assert not list(itertools.chain(*(m.parameters(recurse=False) for _, m in named_quantizers(qmodel))))


def resumed_after_a_stop(monkeypatch, folder, calib, config, step):
    """The state dict of ``quantize`` stopped (KeyboardInterrupt) right after saving ``step`` in
    ``folder``, then started again with the same arguments."""
    finish = ResumeState.finish

    def stopped_after_step(self, saved, model, result=None):
        finish(self, saved, model, result)
        if saved == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "finish", stopped_after_step)
    with pytest.raises(KeyboardInterrupt):
        isvit.quantize(small_vit(), calib, config, progress=False, resume_dir=folder)
    monkeypatch.setattr(ResumeState, "finish", finish)
    return isvit.quantize(small_vit(), calib, config, progress=False, resume_dir=folder).state_dict()


@pytest.mark.parametrize("learnt", [{}, {"round_lr": 3e-2, "softmax_lr": 1e-2}])
def test_a_run_stopped_between_epochs_resumes_to_the_uninterrupted_model(tmp_path, monkeypatch, learnt):
    calib = random_images(16, seed=1)
    config = IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=16, iters=2, batch_size=8, rotate=False,
                                     end_to_end=EndToEnd(epochs=3, batch_size=6, lr=1e-3, scale_lr=1e-2, **learnt))
    uninterrupted = isvit.quantize(small_vit(), calib, config, progress=False).state_dict()
    resumed = resumed_after_a_stop(monkeypatch, tmp_path, calib, config, "end to end epoch 2")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_run_with_a_holdout_stopped_between_epochs_resumes_to_the_uninterrupted_model(tmp_path, monkeypatch):
    calib = random_images(20, seed=1)
    config = IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=20, iters=2, batch_size=8, rotate=False,
                                     end_to_end=EndToEnd(epochs=3, batch_size=6, lr=1e-3, scale_lr=1e-2, holdout=4))
    losses = {}
    uninterrupted = isvit.quantize(small_vit(), calib, config, progress=False, losses=losses).state_dict()
    ran = [k for k in losses["end_to_end"] if "epoch" in k]
    resumed = resumed_after_a_stop(monkeypatch, tmp_path, calib, config, ran[-1] if len(ran) == 1 else ran[-2])
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_augmented_views_are_one_draw_per_batch_and_resume_alike(tmp_path, monkeypatch):
    images = random_images(4, seed=3)
    views = [augment(images, torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(v.shape == images.shape for v in views) and not all(torch.equal(v, images) for v in views)
    # one view for the batch: its halves cut alike are the view's halves
    assert torch.equal(augment(images[:2], torch.Generator().manual_seed(4)), views[4][:2])
    calib = random_images(16, seed=1)
    config = IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=16, iters=1, batch_size=8, rotate=False,
                                     end_to_end=EndToEnd(epochs=2, batch_size=6, lr=1e-3, augment=True))
    uninterrupted = isvit.quantize(small_vit(), calib, config, progress=False).state_dict()
    plain = isvit.quantize(small_vit(), calib, dataclasses.replace(
        config, end_to_end=EndToEnd(epochs=2, batch_size=6, lr=1e-3)), progress=False).state_dict()
    assert not torch.equal(uninterrupted["head.bias"], plain["head.bias"])  # the views changed the training
    resumed = resumed_after_a_stop(monkeypatch, tmp_path, calib, config, "end to end epoch 1")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_the_stage_is_on_in_the_fast_preset_at_3_bits_alone_and_reports_its_losses_and_time():
    calib = random_images(8, seed=1)
    assert IsvitConfig().resolved().end_to_end.epochs == 0
    epochs = {(name, bits): IsvitConfig.from_preset(name, w_bits=w, a_bits=a).resolved().end_to_end.epochs
              for name in isvit.PRESETS for bits, (w, a) in {3: (3, 3), "w3a4": (3, 4), 4: (4, 4), 6: (6, 6)}.items()}
    assert {key for key, n in epochs.items() if n} == {("fast", 3), ("fast", "w3a4")}
    # its time is paid with fewer block iterations than at 4 bits
    assert PRESETS["fast"].at(3, 3).iters < PRESETS["fast"].at(4, 4).iters
    losses, seconds = {}, {}
    config = IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=8, iters=1, batch_size=8, rotate=False,
                                     end_to_end=EndToEnd(epochs=1, batch_size=4))
    isvit.quantize(small_vit(), calib, config, progress=False, losses=losses, seconds=seconds)
    assert list(losses["end_to_end"]) == ["end to end epoch 1"] and len(losses["end_to_end"]["end to end epoch 1"]) == 2
    assert set(seconds) == {"initialise", "stage1", "stage2+3", "end_to_end"} and min(seconds.values()) > 0
    off = copy.deepcopy(losses)
    isvit.quantize(small_vit(), calib, IsvitConfig.from_preset("fast", w_bits=4, a_bits=4, calib_size=8, iters=1),
                   progress=False, losses=(off := {}))
    assert "end_to_end" not in off


def test_the_end_to_end_options_are_isvits_alone(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    argv = ["quantize", "--model", "vit_tiny_patch16_224", "--calib", "/nonexistent", "--save", "q.safetensors",
            "--w-bits", "4", "--a-bits", "4", "--method", "repq", "--e2e-epochs", "2"]
    assert "--method repq does not read --e2e-epochs" in error_of(capsys, argv)
    args = cli.build_parser().parse_args([*argv[:-4], "--method", "isvit", "--preset", "fast", "--e2e-epochs", "2",
                                          "--e2e-lr", "1e-5", "--e2e-loss", "mse", "--e2e-compute-dtype", "bfloat16",
                                          "--e2e-holdout", "16"])
    assert cli.build_config(args).end_to_end == EndToEnd(epochs=2, lr=1e-5, loss="mse", compute_dtype="bfloat16",
                                                         holdout=16)


@needs_shared
def test_the_command_line_records_each_epochs_loss_and_each_stages_time(tmp_path):
    out = tmp_path / "r.json"
    argv = ["quantize", "--model", "vit_tiny_patch16_224", "--weights", str(VIT_TINY_WEIGHTS), "--calib",
            str(CALIB_DIR), "--calib-size", "4", "--method", "isvit", "--preset", "fast", "--w-bits", "4", "--a-bits",
            "4", "--iters", "1", "--recon-batch-size", "4", "--e2e-epochs", "1", "--e2e-batch-size", "2",
            "--e2e-holdout", "1", "--quiet",
            "--save", str(tmp_path / "q.safetensors"), "--json", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["end_to_end"]["epochs"] == 1 and set(result["end_to_end_losses"]["end to end epoch 1"]) == {"first", "last"}
    assert list(result["end_to_end_losses"]) == ["end to end epoch 1"]
    assert len(result["end_to_end_held_out"]) == 2  # the kept image's loss before the epoch and after it
    assert set(result["stage_seconds"]) == {"initialise", "stage1", "stage2+3", "end_to_end"}
