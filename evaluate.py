"""Evaluate saved subnetworks and their fusion: i2t / t2i mAP@all and R@K tables (docs/METHOD.md section 7).

  python evaluate.py --global_ckpt checkpoint/M2HSE/Global/Corel5K/model_best.pth.tar \
                     --local_ckpt checkpoint/M2HSE/Local/Corel5K/model_best.pth.tar --tune_fusion
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import numpy as np

from data import split_file
from gallery import evaluate_shortlist
from metrics import KS, duplicate_captions, precision_recall_curve, protocol_labels, retrieval_metrics
from options import saved_option
from runtime import allocator
from runtime.errors import InputError, report_errors
from runtime.files import atomic_write, atomic_write_bytes, check_output_file, check_writable
from runtime.provenance import sha256_file
from evaluation import (OpenedSplit, Subnetwork, SubnetworkConfig, add_subnetwork_arguments,
                        check_subnetwork_arguments, open_split, score_rows, split_labels)
from vocab import read_captions


@dataclass(frozen=True)
class EvaluationConfig(SubnetworkConfig):
    """What to evaluate and where the results go (evaluate.py's flags, whose defaults are these)."""

    tune_fusion: bool = False  # w: the best on dev instead of fusion_weight
    output: str = ""  # JSON of the table; "": eval_<split>.json next to the first checkpoint
    save_sims: str = ""  # folder for the similarity matrices
    plot: str = ""  # image of the precision-recall curves
    shortlist: int = 0  # K: rank each query's global top K only (gallery.py)
    save_embeddings: str = ""  # with shortlist: the global embeddings' cache folder
    map_all: bool = False  # with shortlist: also global mAP@all


def parse_args(argv: list[str] | None = None) -> EvaluationConfig:
    p = argparse.ArgumentParser(description="Evaluate M2HSE checkpoints and fuse global and local scores.")
    add_subnetwork_arguments(p, "evaluate")
    d = EvaluationConfig()
    p.add_argument("--tune_fusion", action="store_true",
                   help="pick w on dev by the protocol's rsum (label: i2t + t2i mAP; instance: sum of R@K)")
    p.add_argument("--output", default=d.output, help="JSON of the table (default: next to the first checkpoint)")
    p.add_argument("--save_sims", default=d.save_sims, help="folder for the similarity matrices (.npy)")
    p.add_argument("--plot", default=d.plot, help="PNG of precision-recall curves")
    p.add_argument("--shortlist", type=int, default=d.shortlist, metavar="K",
                   help="large galleries: rank each query's global top K only, re-ranked by the local "
                        "subnetwork; reports mAP@K (see gallery.py)")
    p.add_argument("--save_embeddings", "--embeddings", default=d.save_embeddings, metavar="DIR",
                   help="with --shortlist: write the global embeddings of the split to DIR once, reuse them later")
    p.add_argument("--map_all", action="store_true", help="with --shortlist: also global mAP@all over the "
                   "whole gallery, in bounded memory")
    args = p.parse_args(argv)
    if args.shortlist:
        if not args.global_ckpt:
            p.error("--shortlist needs --global_ckpt (the global subnetwork makes the shortlists)")
        if args.shortlist < max(KS):
            p.error(f"--shortlist must be at least {max(KS)} (R@{max(KS)} is read from the shortlist)")
        if args.save_sims or args.plot:
            p.error("--save_sims and --plot need the full similarity matrices: leave out --shortlist")
    elif args.save_embeddings or args.map_all:
        p.error("--save_embeddings and --map_all go with --shortlist")
    if not (args.global_ckpt or args.local_ckpt):
        p.error("give --global_ckpt, --local_ckpt or both")
    check_subnetwork_arguments(p, args)
    return EvaluationConfig.from_flags(args)


def plot_format(path: str) -> str:
    """Image format of --plot from its extension (png when it has none), refused when matplotlib lacks it."""
    from matplotlib.backend_bases import FigureCanvasBase
    extension = os.path.splitext(path)[1][1:].lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if extension not in known:
        raise InputError(f"{path}: --plot has the unknown image extension .{extension} "
                         f"(use one of {', '.join(sorted(known))})")
    return extension


def check_outputs(config: EvaluationConfig) -> None:
    """Every output path writable (and the plot format known) before any scoring."""
    if config.output:
        check_output_file(config.output, "--output")
    else:
        check_writable(os.path.dirname(config.global_ckpt or config.local_ckpt) or ".",
                       "folder of the default --output")
    if config.save_sims:
        check_writable(config.save_sims, "--save_sims folder")
    if config.plot:
        check_output_file(config.plot, "--plot")
        plot_format(config.plot)


def _recalls(direction: str) -> list[tuple[str, int, tuple[str, str]]]:
    """Table columns R@1, R@5, R@10 of one direction."""
    return [(f"{direction} R@1", 7, (direction, "R@1")), ("R@5", 6, (direction, "R@5")),
            ("R@10", 6, (direction, "R@10"))]


# printed table of each protocol: groups of (title, width, (direction, metric)); the instance table puts the
# field's columns first: R@1/5/10 both ways and mR
TABLE_COLUMNS = {
    "label": [[("i2t mAP", 8, ("i2t", "mAP")), ("t2i mAP", 8, ("t2i", "mAP")), ("mean", 7, ("mean_mAP", ""))],
              _recalls("i2t"), _recalls("t2i")],
    "instance": [_recalls("i2t"), _recalls("t2i"), [("mR", 6, ("mR", ""))],
                 [("i2t mAP", 8, ("i2t", "mAP")), ("t2i mAP", 8, ("t2i", "mAP"))]],
}


def format_table(results: dict[str, dict], relevance: str = "label") -> str:
    """One line per row (global, local, fused) with the columns of the protocol."""
    groups = TABLE_COLUMNS[relevance]
    head = f"{'':8s} " + " | ".join(" ".join(f"{title:>{width}s}" for title, width, _ in g) for g in groups)
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        cells = [" ".join(f"{m[key][metric] if metric else m[key]:{width}.2f}" for _, width, (key, metric) in g)
                 for g in groups]
        lines.append(f"{name:8s} " + " | ".join(cells))
    return "\n".join(lines)


def protocol_notes(nets: list[Subnetwork], split: str, relevance: str) -> dict:
    """A notice when a checkpoint was trained for the other protocol; under instance, the duplicate captions."""
    other = [f"{net.kind} --relevance {saved_option(net.opt, 'relevance')}" for net in nets
             if saved_option(net.opt, "relevance") != relevance]
    if other:
        print(f"warning: evaluated with --relevance {relevance}, trained with {', '.join(other)}")
    if relevance != "instance":
        return {}
    dataset = nets[0].dataset(split)
    twins = duplicate_captions(read_captions(split_file(dataset.folder, split, "caps")), dataset.captions_per_image)
    print(f"instance protocol: caption j is relevant only to image j // {dataset.captions_per_image}; "
          f"{twins['captions_with_a_twin_of_another_image']} of {len(dataset)} captions have an identical twin "
          f"describing another image ({twins['distinct_strings']} distinct strings), kept as separate items")
    return {"duplicate_captions": twins}


def plot_curves(rows: dict[str, np.ndarray], labels: tuple[np.ndarray, np.ndarray], path: str) -> None:
    """Precision-recall curves of i2t (image queries, caption gallery) and t2i (the transpose)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = np.linspace(0.0, 1.0, 11)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, direction in zip(axes, ("i2t", "t2i")):
        for name, sims in rows.items():
            matrix = sims if direction == "i2t" else sims.T
            query, gallery = labels if direction == "i2t" else labels[::-1]
            ax.plot(levels, precision_recall_curve(matrix, query, gallery, levels), marker="o", label=name)
        ax.set(title=f"{direction} precision-recall", xlabel="recall", ylabel="precision", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=plot_format(path), dpi=120))
    finally:
        plt.close(fig)


def write_outputs(config: EvaluationConfig, rows: dict[str, np.ndarray], summary: dict, split: str,
                  labels: tuple[np.ndarray, np.ndarray], output: str) -> None:
    atomic_write_bytes(output, json.dumps(summary, indent=2).encode("utf-8"))
    print(f"wrote {output}")
    if config.save_sims:
        for name, sims in rows.items():
            atomic_write(os.path.join(config.save_sims, f"{name}_{split}_sims.npy"), lambda f: np.save(f, sims))
        print(f"wrote similarity matrices to {config.save_sims}")
    if config.plot:
        plot_curves(rows, labels, config.plot)
        print(f"wrote {config.plot}")


def score_split(config: EvaluationConfig, opened: OpenedSplit, labels: tuple[np.ndarray, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Similarity matrices (none with a shortlist) and metrics of each row: global, local, fused."""
    if config.shortlist:
        rows, results = {}, evaluate_shortlist(opened.nets, opened.split, opened.weight, config.shortlist,
                                               config.save_embeddings, config.map_all, config.relevance)
    else:
        rows = score_rows(opened.nets, opened.split, opened.weight)
        results = {name: retrieval_metrics(sims, *labels, relevance=config.relevance)
                   for name, sims in rows.items()}
    for name in results:
        results[name]["mean_mAP"] = results[name]["rsum"] / 2
    return rows, results


def print_results(config: EvaluationConfig, opened: OpenedSplit, results: dict[str, dict]) -> None:
    """The split, the fusion weight, the table and notices of queries without a relevant item."""
    weight, dataset = opened.weight, opened.nets[0].dataset(opened.split)
    print(f"split: {opened.split} ({dataset.describe()}, {opened.nets[0].data_name})"
          + (f", fusion weight w = {weight:.2f}{' (tuned on dev)' if config.tune_fusion else ''}"
             if weight is not None else ""))
    if config.shortlist:
        print(f"mAP = mAP@{config.shortlist}: AP over each query's top {config.shortlist} (global shortlist, "
              "re-ranked per row), normalised by the relevant items in it")
    print(format_table(results, config.relevance))
    if "mAP@all" in results.get("global", {}):
        full = results["global"]["mAP@all"]
        print(f"global mAP@all over the whole gallery: i2t {full['i2t']['mAP']:.2f}  t2i {full['t2i']['mAP']:.2f}")
    for name, m in results.items():
        for direction in ("i2t", "t2i"):
            if m[direction]["no_relevant"]:
                print(f"notice: {name} {direction}: {m[direction]['no_relevant']} queries have no relevant item "
                      "and are left out of the means")


def run(config: EvaluationConfig) -> dict:
    """Evaluate as evaluate.py does: print the table, write the JSON summary (and the similarity matrices and
    the plot when asked); returns the summary."""
    check_outputs(config)
    opened = open_split(config, config.tune_fusion)
    nets, split = opened.nets, opened.split
    notes = protocol_notes(nets, split, config.relevance)
    labels = split_labels(nets, split)
    rows, results = score_split(config, opened, labels)
    print_results(config, opened, results)
    dataset = nets[0].dataset(split)
    output = config.output or os.path.join(os.path.dirname(nets[0].path) or ".", f"eval_{split}.json")
    summary = {"split": split, "data_name": nets[0].data_name, "images": dataset.num_images,
               "captions_per_image": dataset.captions_per_image, "fusion_weight": opened.weight,
               "metric": f"mAP@{config.shortlist}" if config.shortlist else "mAP@all", "relevance": config.relevance,
               **notes,
               "checkpoints": {net.kind: net.path for net in nets}, "rows": results,
               "data": {net.kind: net.provenance for net in nets},
               "checkpoint_sha256": {net.kind: sha256_file(net.path) for net in nets}}
    write_outputs(config, rows, summary, split, protocol_labels(config.relevance, *labels), output)
    return summary


@report_errors
def main(argv: list[str] | None = None) -> dict:
    """evaluate.py: the flags' evaluation; returns its summary."""
    return run(parse_args(argv))


if __name__ == "__main__":
    allocator.keep_freed_memory()
    main()
