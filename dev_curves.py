"""Dev curves of training runs as one PNG: mean of i2t and t2i mAP per epoch, label-level and instance-level.

  python dev_curves.py --runs runs/rsicd_precomp --out docs/figures/dev_curves.png

--runs is reproduce.py's <runs_dir>/<data_name> (folders <variant>/<kind>/seed<s>/performance.log); each
variant and subnetwork is one line, the mean over its seeds. Logs written before the instance-level
numbers were logged draw the label-level panel only.
"""
from __future__ import annotations

import argparse
import glob
import os

import numpy as np

from runtime.errors import InputError, report_errors
from runtime.files import atomic_write, check_output_file
from runtime.run_log import PERFORMANCE_LOG, read_performance

PANELS = (("label", "i2t_mAP", "t2i_mAP"), ("instance", "instance_i2t_mAP", "instance_t2i_mAP"))


def read_curves(log: str) -> dict[str, dict[int, float]]:
    """Mean mAP (percent) by epoch of each protocol in one performance.log; a re-evaluated epoch keeps its last."""
    curves: dict[str, dict[int, float]] = {protocol: {} for protocol, *_ in PANELS}
    for values in read_performance(log):
        for protocol, i2t, t2i in PANELS:
            if i2t in values:
                curves[protocol][values["epoch"]] = (values[i2t] + values[t2i]) / 2
    return curves


def runs_of(folder: str) -> dict[str, list[str]]:
    """'variant kind' -> the performance.log of each seed, under reproduce.py's runs folder of one dataset."""
    runs: dict[str, list[str]] = {}
    for log in sorted(glob.glob(os.path.join(folder, "*", "*", "seed*", PERFORMANCE_LOG))):
        variant, kind = log.split(os.sep)[-4:-2]
        runs.setdefault(f"{variant} {kind}", []).append(log)
    if not runs:
        raise InputError(f"{folder}: no <variant>/<kind>/seed<s>/performance.log found (reproduce.py's runs folder "
                         "of one dataset, e.g. runs/rsicd_precomp)")
    return runs


def mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Epochs every seed reached and the mean over seeds at each."""
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    return epochs, [float(np.mean([c[e] for c in curves])) for e in epochs]


def draw_dev_curves(runs: dict[str, list[str]], path: str, title: str = "") -> None:
    """One PNG, one panel per protocol, one line per run name (mean over its logs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (protocol, *_) in zip(axes, PANELS):
        for name, logs in runs.items():
            curves = [read_curves(log)[protocol] for log in logs]
            if all(curves):
                epochs, values = mean_curve(curves)
                seeds = f"{len(logs)} seed" + ("s" if len(logs) > 1 else "")
                ax.plot(epochs, values, marker="o", markersize=3, label=f"{name} ({seeds})")
        ax.set(title=f"{protocol}-level dev mAP (mean of i2t and t2i)", xlabel="epoch (0: before training)",
               ylabel="mAP (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


@report_errors
def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="reproduce.py's runs folder of one dataset")
    p.add_argument("--out", default="dev_curves.png", help="PNG to write")
    args = p.parse_args(argv)
    check_output_file(args.out, "--out")
    draw_dev_curves(runs_of(args.runs), args.out, os.path.basename(os.path.normpath(args.runs)))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
