"""I&S-ViT accuracy on the shared ViT-Ti: W8/A8, W4/A8 (the deployable settings of docs/onnx.md),
W6/A6, W4/A4, W3/A3, the paper's ablation at W3/A3 and W4/A4, and one row per low-bit option.

Runs the `isvit` CLI once per setting and seed (a fresh process each, so peak memory is per run),
calibrating on imagenet-calib-1000 (the method's default 1024 images, i.e. all 1000) and evaluating
on all of imagenet-val-1300, with --threads torch threads (default 1; the thread count changes
float rounding and so the trained model: compare rows run with the same count). The output file
holds this invocation's rows only (each with its command line, date and CPU) and is rewritten after
every run.

    python benchmarks/isvit_accuracy.py [--preset fast] [--only w3a3 ...] [--seeds 0 1 2] [--threads 1]
        [--iters N] [--calib-size 1024] [--qdrop P] [--outlier-ratio R] [--save-dir DIR] [--resume-from FILE ...]
        [--out results/isvit_accuracy.json]

--seeds: each setting is run once per seed (the seed draws the calibration subset when there are
more images than --calib-size, the rotation, the order of the reconstruction batches and QDrop's
masks); the output's rows are "preset/setting/seedS" and its "summary" holds each setting's mean and
sample standard deviation of top-1 over the seeds, as does the table printed at the end.

The ablation (``ABLATION``, at W3/A3 and W4/A4: "w3a3-log2sqrt2", ...): the post-Softmax quantizer
SULQ vs log-sqrt2 vs uniform; without stage 1, and without it but with its training steps given to
stage 3 (``--iters`` so that the steps add up to the preset's, ``same_steps_iters``); without the
fold ("no-reparam", ``--no-fold``: per-tensor post-LayerNorm quantizers from the start); without the
outlier channels' own grid. The options (``OPTIONS``: w3a3-fisher, w4a4-no-rotate, ...) each add one flag
to the preset at W3/A3 and W4/A4. --qdrop and --outlier-ratio set those for every setting (a
setting's own flag comes after and wins).

--iters N trains every setting N iterations per unit instead of the preset's (a setting's own
--iters, as in w3a3-iters100, wins; no-stage1-same-steps gives stage 3 the steps of N with stage 1):
it reruns an ablation of an earlier preset, e.g. --iters 60 the fast preset of 2026-12-04.

--save-dir DIR keeps each quantized model as DIR/SETTING_sSEED.safetensors (for
benchmarks/studies/softmax_error.py). --resume-from FILE ... takes the rows of earlier outputs whose
command line is the one this run would use (where a model was saved aside; the iterations per unit compared
as the row recorded them, so a row run when the preset trained 60 matches --iters 60 and not a plain
command now) instead of running them again;
without it every setting and seed asked for is run. With --resumed-only nothing is run: the table
and summary of the rows found (e.g. `--resume-from results/issue21/*.json`), the others left out.
"""

from __future__ import annotations

import argparse
import statistics
from functools import cache

from record import CALIB, MODEL, ROOT, VAL, WEIGHTS, resumable_rows, resume_key, run_cli, write_json

SETTINGS = {
    "w8a8": ["--w-bits", "8", "--a-bits", "8"],
    "w4a8": ["--w-bits", "4", "--a-bits", "8"],
    "w6a6": ["--w-bits", "6", "--a-bits", "6"],
    "w4a4": ["--w-bits", "4", "--a-bits", "4"],
    "w3a3": ["--w-bits", "3", "--a-bits", "3"],
}
# The paper's ablation (issue 21): the post-Softmax quantizer, stage 1, the fold; and the outlier
# grid of this project. "no-stage1-same-steps" gives stage 1's training steps to stage 3 (a callable:
# the iterations depend on the preset).
ABLATION = {
    "log2sqrt2": ["--softmax-quantizer", "log2sqrt2"],
    "uniform-softmax": ["--softmax-quantizer", "uniform"],
    "no-stage1": ["--no-stage1"],
    "no-stage1-same-steps": lambda preset, bits, iters: ["--no-stage1", "--iters", str(same_steps_iters(preset, bits, iters))],
    "no-reparam": ["--no-fold"],  # the setting keeps the name its rows were recorded under
    "no-outlier-split": ["--outlier-ratio", "0"],
}
# The options for low bits (issue 10), one at a time on top of the preset, at W3/A3 and W4/A4.
# "p999", "no-rotate", "token" and "ste" take away what the fast preset does at <= 4 bits (activation
# percentiles below 0.999, the rotation, the Fisher-weighted loss, learnt rounding offsets); the
# others add one option. "fisher" and "offset" give the preset's own loss and rounding explicitly:
# they measured each before it became the preset's (the same model as the plain setting now). A row
# measures the code of its day: --resume-from matches rows by command line only.
OPTIONS = {
    "p999": ["--act-percentile", "0.999"],
    "no-rotate": ["--no-rotate"],
    "learn-scales": ["--learn-scales", "--scale-lr", "0.05"],
    "offset": ["--rounding", "offset", "--round-lr", "0.03"],
    # the fast preset's own round-lr and round-reg (chosen on one block, unit_probe.py), given
    # explicitly so that the row reruns the same if the preset's change
    "adaround": ["--rounding", "adaround", "--round-lr", "0.3", "--round-reg", "1000"],
    "fisher": ["--loss", "fisher"],
    "token": ["--loss", "token"],
    "ste": ["--rounding", "ste"],
    # issue 21, item 4: 100 iterations per unit at <= 4 bits, measured while the preset trained 60 (now the preset's)
    "iters100": ["--iters", "100"],
    # issue 30: the end-to-end stage after the preset's block stages, with the settings held-out images liked best
    # at W3/A3 (2 epochs, learning rates 3e-4 and 3e-3; results/studies/e2e_heldout.jsonl); at 3 bits the
    # preset's own since 2026-12-07 (its rows of before ran after 140 iterations per unit: --iters 140)
    "e2e": ["--e2e-epochs", "2", "--e2e-lr", "3e-4", "--e2e-scale-lr", "3e-3"],
    # the fast preset at <= 3 bits before it took the end-to-end stage (140 iterations per unit, no stage)
    "no-e2e-iters140": ["--e2e-epochs", "0", "--iters", "140"],
}
for _bits in ("3", "4"):
    for _name, _flags in {**ABLATION, **OPTIONS}.items():
        SETTINGS[f"w{_bits}a{_bits}-{_name}"] = (_bits, _flags)
SETTINGS["w6a6-e2e"] = ("6", OPTIONS["e2e"])


@cache
def same_steps_iters(preset: str, bits: int, iters: int | None = None) -> int:
    """Stage 3's iterations per unit that make a run without stage 1 take as many training steps as
    ``preset``'s run with it at W``bits``/A``bits`` on this ViT-Ti, with ``iters`` per unit (default:
    the preset's) in both stages (stage 1 trains the units with an activation quantizer, stage 3
    every unit with a quantizer: 13 and 14 units, so 100 -> 193, 60 -> 116)."""
    import timm

    from isvit.config import IsvitConfig
    from isvit.pipeline import reconstruction_steps, set_quantizers
    from isvit.wrap import wrap_model

    changes = {"iters": iters} if iters is not None else {}
    config = IsvitConfig.from_preset(preset, w_bits=bits, a_bits=bits, **changes)
    model = wrap_model(timm.create_model(MODEL, pretrained=False), config.placement())
    set_quantizers(model, False, "weight")
    with_stage1 = reconstruction_steps(model, config)
    per_iter_without = reconstruction_steps(model, IsvitConfig.from_preset(preset, w_bits=bits, a_bits=bits,
                                                                           stage1=False, iters=1))
    return round(with_stage1 / per_iter_without)


def setting_flags(name: str, preset: str, iters: int | None = None) -> list[str]:
    """The CLI flags of setting ``name`` beyond the common ones (``iters``: the run's --iters)."""
    flags = SETTINGS[name]
    if isinstance(flags, list):
        return flags
    bits, extra = flags
    extra = extra(preset, int(bits), iters) if callable(extra) else extra
    return ["--w-bits", bits, "--a-bits", bits, *extra]


def command_iters(command: list[str]) -> int:
    """The iterations per unit the ``quantize`` command line trains: its last --iters, else its
    preset's at its bit-widths."""
    from isvit.config import PRESETS

    def value(flag: str) -> str:  # the value after the flag's last occurrence
        return command[len(command) - command[::-1].index(flag)]

    if "--iters" in command:
        return int(value("--iters"))
    return PRESETS[value("--preset")].at(int(value("--w-bits")), int(value("--a-bits"))).iters


def iters_key(command: list[str], iters: int) -> tuple[str, ...]:
    """``command`` as --resume-from matches it here: without --save (``resume_key``) and with its
    iterations per unit made explicit, so that a row run with the preset's 60 matches --iters 60."""
    args = list(resume_key(command))
    while "--iters" in args:
        del args[args.index("--iters"):args.index("--iters") + 2]
    return (*args, "--iters", str(iters))


def recorded_iters(row: dict) -> int | None:
    """The iterations per unit a row recorded: in its reconstruction's settings ("reconstruction"),
    at the top level in rows recorded before those were nested; None where it recorded none."""
    settings = row.get("reconstruction", {})
    return settings["iters"] if "iters" in settings else row.get("iters")


def resumable(paths: list[str]) -> dict[tuple[str, ...], dict]:
    """The rows of earlier outputs by ``iters_key``, with the iterations each row recorded (a row
    without them is taken to have trained what its command trains with today's presets)."""
    rows = {}
    for path in paths:
        for row in resumable_rows(path).values():
            rows[iters_key(row["command"], recorded_iters(row) or command_iters(row["command"]))] = row
    return rows


def reconstruction_losses(row: dict) -> dict:
    """The per-unit losses of a row's block reconstruction: ``isvit quantize --json`` writes them
    under "reconstruction_losses"; rows recorded before that have them under "reconstruction"
    (which now holds the reconstruction's settings)."""
    if "reconstruction_losses" in row:
        return row["reconstruction_losses"]
    old = row.get("reconstruction", {})
    return old if "stage3" in old else {}


def summarise(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for one row) of top-1 over one setting's seeds, with
    each seed's top-1, the median calibration time and, where the rows recorded them, each unit's
    stage-3 loss before and after its training, averaged over the seeds (``stage3_loss``)."""
    top1 = [r["top1"] for r in rows]
    summary = {"seeds": [int(r["seed"]) for r in rows], "iters": sorted({recorded_iters(r) for r in rows} - {None}),
               "top1": top1, "top1_mean": statistics.fmean(top1),
               "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
               "calib_seconds_median": statistics.median(r["calib_seconds"] for r in rows),
               "threads": rows[0]["threads"], "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rows)}
    stage3 = [losses["stage3"] for losses in map(reconstruction_losses, rows) if "stage3" in losses]
    if stage3:
        summary["stage3_loss"] = {unit: {when: statistics.fmean(s[unit][when] for s in stage3) for when in ("before", "after")}
                                  for unit in stage3[0]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "isvit_accuracy.json"))
    parser.add_argument("--preset", default="fast", choices=["fast", "paper", "thorough"])
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--limit", type=int, help="evaluate on the first N images only (quick check)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run every setting once per seed (default: 0); the summary gives mean and std")
    parser.add_argument("--iters", type=int, help="iterations per unit of every setting (default: the preset's)")
    parser.add_argument("--calib-size", type=int, default=1024, help="calibration images (default 1024: all 1000)")
    parser.add_argument("--qdrop", type=float, help="QDrop probability of every setting (default: the preset's)")
    parser.add_argument("--outlier-ratio", type=float, help="outlier ratio of every setting (default: the method's)")
    parser.add_argument("--save-dir", metavar="DIR", help="save each quantized model in DIR")
    parser.add_argument("--resume-from", metavar="FILE", nargs="+", default=[],
                        help="reuse the rows of these earlier outputs run with the same command")
    parser.add_argument("--resumed-only", action="store_true",
                        help="run nothing: summarise the rows found in --resume-from, leave out the others")
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    resume = resumable(args.resume_from)

    common = [
        "quantize", "--method", "isvit", "--preset", args.preset, "--no-fp", "--model", MODEL, "--weights", WEIGHTS,
        "--calib", CALIB, "--calib-size", str(args.calib_size), "--data", VAL, "--batch-size", "64",
        "--threads", str(args.threads),
    ] + (["--limit", str(args.limit)] if args.limit else [])
    common += (["--iters", str(args.iters)] if args.iters is not None else [])
    common += (["--qdrop", str(args.qdrop)] if args.qdrop is not None else [])
    common += (["--outlier-ratio", str(args.outlier_ratio)] if args.outlier_ratio is not None else [])
    results, by_setting, summary = {}, {}, {}
    for name in args.only or list(SETTINGS):
        for seed in args.seeds:
            key = f"{args.preset}/{name}" + (f"/seed{seed}" if len(args.seeds) > 1 else "")
            save = ["--save", f"{args.save_dir}/{name}_s{seed}.safetensors"] if args.save_dir else []
            command = common + ["--seed", str(seed)] + setting_flags(name, args.preset, args.iters) + save
            match = iters_key(command, command_iters(command))
            if args.resumed_only and match not in resume:
                print(f"left out (not in --resume-from): {name} seed {seed}")
                continue
            row = run_cli(command, resume, key=match)
            results[key] = row
            rows = by_setting.setdefault(f"{args.preset}/{name}", [])
            rows.append(row)
            summary[f"{args.preset}/{name}"] = summarise(rows)
            write_json(args.out, {**results, "summary": summary})

    print("| setting | preset | seeds | top-1 | std | calib s (median) | threads | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for key, s in summary.items():
        print(f"| {key.split('/', 1)[1]} | {args.preset} | {len(s['seeds'])} | {s['top1_mean']:.2f} | {s['top1_std']:.2f} | "
              f"{s['calib_seconds_median']:.0f} | {s['threads']} | {s['peak_rss_mb_max']:.0f} |")
    print(f"\nJSON in {args.out}")


if __name__ == "__main__":
    main()
