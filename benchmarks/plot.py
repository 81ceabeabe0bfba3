"""The picture of the results: top-1 against bit-width per method on the shared ViT-Ti.

    python benchmarks/plot.py [--accuracy results/accuracy.json] [--isvit results/isvit_accuracy.json ...]
                              [--out docs/results.png]

Needs matplotlib (``pip install -e ".[plot]"``). Reads the benchmarks' JSON, nothing else:

- ``accuracy.json`` (benchmarks/accuracy.py, a list of CLI results): full precision (the ``fp32``
  entry), drawn as a horizontal line, and ``minmax`` and ``repq`` with their default bias correction;
- ``isvit_accuracy.json`` (benchmarks/isvit_accuracy.py, ``{"preset/setting": CLI result}``): the
  plain ``wNaN`` settings of each preset (one line per preset; the ablations are left out), at the
  mean over seeds for a setting run with ``--seeds``; with several files, a later file's point
  replaces an earlier one's (newer runs of the same setting);
- the peers' official code on the same files (``accuracy.OFFICIAL``), drawn as markers.

Entries without ``w_bits``, ``a_bits`` or ``top1``, or with weight and activation bits that differ,
are skipped, so the files may grow other rows.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from accuracy import OFFICIAL  # benchmarks/accuracy.py: the peers' official top-1

ROOT = Path(__file__).resolve().parents[1]

OFFICIAL_LABELS = {"repq": "RepQ-ViT official code", "isvit": "I&S-ViT official code"}
COLORS = {"minmax": "tab:gray", "repq": "tab:blue", "isvit": "tab:red", "isvit (paper preset)": "tab:purple"}
LABEL_GAP = 3.0  # a point's top-1 is written beside it unless another line passes within this many points


def _bits_and_top1(result) -> tuple[int, float] | None:
    """(bits, top-1) of one CLI result, or None if it is not a W=A result with a top-1."""
    if not isinstance(result, dict) or not all(k in result for k in ("w_bits", "a_bits", "top1")):
        return None
    if result["w_bits"] != result["a_bits"]:
        return None
    return int(result["w_bits"]), float(result["top1"])


def read_accuracy(path: str | Path) -> tuple[float | None, dict[str, dict[int, float]]]:
    """Full-precision top-1 and {method: {bits: top-1}} of minmax and repq (bias correction on)."""
    fp_top1, series = None, {}
    for result in json.loads(Path(path).read_text()):
        point = _bits_and_top1(result)
        if point is None:
            continue
        method = result.get("method")
        if method == "fp32":
            fp_top1 = point[1]
        elif method in ("minmax", "repq") and result.get("bias_correction", True):
            series.setdefault(method, {})[point[0]] = point[1]
    return fp_top1, series


def read_isvit(path: str | Path, aliases: dict[str, str] | None = None) -> dict[str, dict[int, float]]:
    """{"isvit (PRESET preset)": {bits: top-1}} from the plain wNaN settings of isvit_accuracy.json;
    a setting run with several seeds (``--seeds``: rows "preset/wNaN/seedS") is drawn at the mean
    of its ``summary``. ``aliases`` {setting: wNaN}: settings drawn as that plain one, in its place
    (e.g. "w3a3-iters100", the preset's 100 iterations measured before they became its default)."""
    aliases = aliases or {}
    series = {}
    data = json.loads(Path(path).read_text())
    summaries = sorted(data.get("summary", {}).items(), key=lambda item: item[0].partition("/")[2] in aliases)
    for key, summary in summaries:  # the aliased settings last: they replace the plain ones
        preset, _, setting = key.partition("/")
        setting = aliases.get(setting, setting)
        match = re.fullmatch(r"w(\d)a\1", setting)
        if match and len(summary.get("seeds", [])) > 1:
            series.setdefault(f"isvit ({preset} preset)", {})[int(match.group(1))] = float(summary["top1_mean"])
    for key, result in data.items():
        if key.count("/") > 1:  # one seed's row of a setting with several: its summary stands for it
            continue
        point = _bits_and_top1(result)
        if point is None:
            continue
        preset, _, setting = key.rpartition("/")
        preset = result.get("preset") or preset or "?"
        if setting == f"w{point[0]}a{point[0]}":
            series.setdefault(f"isvit ({preset} preset)", {}).setdefault(point[0], point[1])
    return series


def draw(series: dict[str, dict[int, float]], fp_top1: float | None, out: str | Path) -> None:
    """One line per series, full precision as a horizontal line, the official numbers as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=150)
    if fp_top1 is not None:
        ax.axhline(fp_top1, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"full precision {fp_top1:.2f}", (0.01, fp_top1), xycoords=("axes fraction", "data"),
                    xytext=(0, 4), textcoords="offset points", fontsize=9)
    for label, points in series.items():
        bits = sorted(points)
        color = COLORS.get(label, COLORS.get(label.split()[0]))
        ax.plot(bits, [points[b] for b in bits], marker="o", linewidth=2, color=color, label=label)
        for b in bits:
            others = [p[b] for other, p in series.items() if other != label and b in p]
            if all(abs(points[b] - t) > LABEL_GAP for t in others):  # crowded points go unlabelled
                ax.annotate(f"{points[b]:.1f}", (b, points[b]), xytext=(-7, -3), textcoords="offset points", ha="right",
                            fontsize=8, color=color)
    for method, label in OFFICIAL_LABELS.items():
        marks = sorted((b, top1) for (m, b), top1 in OFFICIAL.items() if m == method)
        ax.scatter([b for b, _ in marks], [t for _, t in marks], marker="D", s=45, facecolors="none",
                   edgecolors=COLORS[method], linewidths=1.5, label=label, zorder=3)
    all_bits = sorted({b for points in series.values() for b in points} | {b for _, b in OFFICIAL})
    ax.set_xticks(all_bits, [f"W{b}/A{b}" for b in all_bits])
    ax.set_xlim(all_bits[0] - 0.4, all_bits[-1] + 0.6)
    ax.set_ylim(-3, 90)
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("ViT-Ti (vit_tiny_patch16_224), 1300 ImageNet validation images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", default=str(ROOT / "results" / "accuracy.json"))
    parser.add_argument("--isvit", nargs="+", default=[str(ROOT / "results" / "isvit_accuracy.json")])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.png"))
    parser.add_argument("--alias", nargs="+", default=[], metavar="SETTING=wNaN",
                        help="draw a setting run with seeds as the plain one, e.g. w3a3-iters100=w3a3")
    args = parser.parse_args(argv)
    aliases = dict(item.split("=", 1) for item in args.alias)
    fp_top1, series = read_accuracy(args.accuracy)
    for path in args.isvit:
        for label, points in read_isvit(path, aliases).items():
            series.setdefault(label, {}).update(points)
    draw(series, fp_top1, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
