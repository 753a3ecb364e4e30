"""Evaluate saved subnetworks and their fusion: i2t / t2i mAP@all and R@K tables (docs/METHOD.md section 7).

  python evaluate.py --global_ckpt checkpoint/M2HSE/Global/Corel5K/model_best.pth.tar \
                     --local_ckpt checkpoint/M2HSE/Local/Corel5K/model_best.pth.tar --tune_fusion
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from data import MAX_CAPTION_WORDS, PrecompDataset, has_split, split_file
from errors import InputError, check_number, report_errors
from files import atomic_write, atomic_write_bytes, check_output_file, check_writable, read_utf8
from gallery import evaluate_shortlist
from metrics import KS, RELEVANCE, duplicate_captions, precision_recall_curve, protocol_labels, retrieval_metrics
from models import load_trained
from options import resolve_device, saved_option
from provenance import data_fingerprint, describe_change, sha256_file
from scoring import similarity_matrix
from vocab import read_captions

FUSION_GRID = np.round(np.arange(0.0, 1.0001, 0.05), 2)


def add_subnetwork_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """Flags shared by evaluate.py, visualize.py and search.py: checkpoints, their data, split, fusion, device."""
    p.add_argument("--global_ckpt", default="", help="checkpoint of train_global.py")
    p.add_argument("--local_ckpt", default="", help="checkpoint of train_local.py")
    p.add_argument("--data_path", default="", help="data folder when one checkpoint is given "
                   "(default: the checkpoint's own)")
    p.add_argument("--global_data_path", default="", help="coarse-grained data folder (default: the checkpoint's)")
    p.add_argument("--local_data_path", default="", help="fine-grained data folder (default: the checkpoint's)")
    p.add_argument("--data_name", default="", help="dataset name (default: the checkpoint's)")
    p.add_argument("--split", default="test", help=f"split to {verb}; test falls back to dev when absent")
    p.add_argument("--fusion_weight", type=float, default=0.5, help="w in w * global + (1 - w) * local")
    p.add_argument("--chunk", type=int, default=1000, help="images / captions per block of local scoring")
    p.add_argument("--batch_size", type=int, default=0, help="encoding batch (default: the checkpoint's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--relevance", choices=RELEVANCE, default="label",
                   help="label: relevant = shared label (the paper's); instance: caption j is relevant only "
                        "to image j // k (the field's R@K protocol)")
    p.add_argument("--allow_unknown_words", action="store_true",
                   help="go on when most caption words are outside the checkpoint's vocabulary")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate M2HSE checkpoints and fuse global and local scores.")
    add_subnetwork_arguments(p, "evaluate")
    p.add_argument("--tune_fusion", action="store_true",
                   help="pick w on dev by the protocol's rsum (label: i2t + t2i mAP; instance: sum of R@K)")
    p.add_argument("--output", default="", help="JSON of the table (default: next to the first checkpoint)")
    p.add_argument("--save_sims", default="", help="folder for the similarity matrices (.npy)")
    p.add_argument("--plot", default="", help="PNG of precision-recall curves")
    p.add_argument("--shortlist", type=int, default=0, metavar="K",
                   help="large galleries: rank each query's global top K only, re-ranked by the local "
                        "subnetwork; reports mAP@K (see gallery.py)")
    p.add_argument("--save_embeddings", "--embeddings", default="", metavar="DIR",
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
    return args


def check_subnetwork_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags of add_subnetwork_arguments in range (NaN included), before any checkpoint is read."""
    if not 0.0 <= args.fusion_weight <= 1.0:  # False for NaN too
        p.error("--fusion_weight must lie in [0, 1]")
    check_number("--chunk", args.chunk, minimum=1)
    check_number("--batch_size", args.batch_size, minimum=0)


def plot_format(path: str) -> str:
    """Image format of --plot from its extension (png when it has none), refused when matplotlib lacks it."""
    from matplotlib.backend_bases import FigureCanvasBase
    extension = os.path.splitext(path)[1][1:].lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if extension not in known:
        raise InputError(f"{path}: --plot has the unknown image extension .{extension} "
                         f"(use one of {', '.join(sorted(known))})")
    return extension


def check_outputs(args: argparse.Namespace, nets: list["Subnetwork"]) -> None:
    """Every output path writable (and the plot format known) before any scoring."""
    if args.output:
        check_output_file(args.output, "--output")
    else:
        check_writable(os.path.dirname(nets[0].path) or ".", "folder of the default --output")
    if args.save_sims:
        check_writable(args.save_sims, "--save_sims folder")
    if args.plot:
        check_output_file(args.plot, "--plot")
        plot_format(args.plot)


class Subnetwork:
    """A trained subnetwork with the data it reads; scores splits on demand, once each."""

    def __init__(self, kind: str, path: str, data_path: str, args: argparse.Namespace, device: torch.device):
        self.kind, self.path, self.device, self.args = kind, path, device, args
        self.model, ckpt, self.vocab = load_trained(path, kind, device)
        self.opt = ckpt["opt"]
        self.training_data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else None
        self.data_path = data_path or self._training_data_path()
        self.data_name = args.data_name or self.opt["data_name"]
        self.max_words = int(self.opt.get("max_caption_words", MAX_CAPTION_WORDS))  # as in training
        self.out = sys.stderr if getattr(args, "json", False) else sys.stdout  # search.py --json: stdout is JSON
        self._sims: dict[str, np.ndarray] = {}
        self.datasets: dict[str, PrecompDataset] = {}
        self.provenance: dict[str, dict] = {}  # by split: the folder read and how it compares with training

    def _training_data_path(self) -> str:
        """The absolute folder the checkpoint records (not the relative --data_path, which depends on where
        the command runs), when it still exists; else the option as given in training."""
        folder = (self.training_data or {}).get("folder")
        if isinstance(folder, str) and os.path.isdir(folder):
            return os.path.dirname(folder)
        return self.opt["data_path"]

    def dataset(self, split: str) -> PrecompDataset:
        if split not in self.datasets:
            self.datasets[split] = PrecompDataset(self.data_path, self.data_name, split, self.vocab, self.kind,
                                                  self.opt["cnn_dim"], self.opt["bovw_dim"], self.path,
                                                  max_words=self.max_words,
                                                  allow_unknown=self.args.allow_unknown_words)
            self.provenance[split] = self._compare_with_training(split)
        return self.datasets[split]

    def _compare_with_training(self, split: str) -> dict:
        """Say which folder a split is read from and whether its files are those of the training data."""
        current = data_fingerprint(self.datasets[split].folder)
        record = {"folder": current["folder"], "fingerprint": current}
        if self.training_data is None:
            print(f"{self.kind} data: {current['folder']} ({split}); the checkpoint has no record of its "
                  "training data to compare with", file=self.out)
            return {**record, "same_as_training": None}
        change = describe_change(self.training_data, current, split)
        print(f"{self.kind} data: {current['folder']} ({split})"
              + (f"; notice: {change}" if change else "; same files as in training"), file=self.out, flush=True)
        return {**record, "same_as_training": not change, **({"differs": change} if change else {})}

    def sims(self, split: str) -> np.ndarray:
        if split not in self._sims:
            batch = self.args.batch_size or self.opt["batch_size"]
            self._sims[split] = similarity_matrix(self.model, self.dataset(split), batch, self.device,
                                                  chunk=self.args.chunk)
        return self._sims[split]


def open_subnetworks(args: argparse.Namespace, device: torch.device) -> list[Subnetwork]:
    both = bool(args.global_ckpt and args.local_ckpt)
    nets = []
    for kind, path, own_path in (("global", args.global_ckpt, args.global_data_path),
                                 ("local", args.local_ckpt, args.local_data_path)):
        if path:
            nets.append(Subnetwork(kind, path, own_path or ("" if both else args.data_path), args, device))
    if both and nets[0].vocab.word2idx != nets[1].vocab.word2idx:
        raise InputError(f"{args.global_ckpt} and {args.local_ckpt} were trained on different vocabularies; "
                         "fusion needs both subnetworks trained on the same one")
    return nets


def pick_split(nets: list[Subnetwork], split: str) -> str:
    net = nets[0]
    if has_split(net.data_path, net.data_name, split):
        return split
    if split == "test" and has_split(net.data_path, net.data_name, "dev"):
        print(f"notice: no test split in {net.data_path}/{net.data_name}; evaluating on dev "
              "(the split used to select the checkpoint)")
        return "dev"
    raise InputError(f"{os.path.join(net.data_path, net.data_name, split + '_caps.txt')}: split not found")


def check_same_items(nets: list[Subnetwork], split: str) -> None:
    first, second = (net.dataset(split) for net in nets)
    # Equal image labels and equal caption labels imply equal N and k.
    if not (torch.equal(first.labels, second.labels) and torch.equal(first.caption_labels, second.caption_labels)):
        raise InputError(f"the {split} split of {nets[0].data_path} and {nets[1].data_path} hold different "
                         f"items ({first.describe()} against {second.describe()}, or labels disagree); fusion "
                         "needs image i and caption j to be the same in both")
    for kind in ("caps", "images"):  # the same items in the same order, not only the same labels
        paths = [os.path.join(d.folder, f"{split}_{kind}.txt") for d in (first, second)]
        if kind == "images" and not all(os.path.isfile(p) for p in paths):
            continue  # image lists are optional (the authors' folders have none): labels and captions decide
        lines = [read_utf8(p, "caption file" if kind == "caps" else "image list").splitlines() for p in paths]
        if lines[0] != lines[1]:
            row = next((i for i, (a, b) in enumerate(zip(*lines)) if a != b), min(map(len, lines)))
            raise InputError(f"{paths[0]} and {paths[1]} differ at line {row + 1}: fusion needs the two folders to "
                             f"hold the same {'captions' if kind == 'caps' else 'images'} in the same order")


def tune_weight(nets: list[Subnetwork], relevance: str = "label") -> float:
    """Fusion weight with the best dev rsum of the protocol (first best on ties)."""
    labels = split_labels(nets, "dev")
    g, l = nets[0].sims("dev"), nets[1].sims("dev")
    scores = [retrieval_metrics(w * g + (1 - w) * l, *labels, relevance=relevance)["rsum"]
              for w in FUSION_GRID]
    return float(FUSION_GRID[int(np.argmax(scores))])


def split_labels(nets: list[Subnetwork], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the rows (N images) and of the columns (k·N captions) of a split's similarity matrices."""
    dataset = nets[0].dataset(split)
    return dataset.labels.numpy(), dataset.caption_labels.numpy()


def score_rows(nets: list[Subnetwork], split: str, weight: float | None) -> dict[str, np.ndarray]:
    rows = {net.kind: net.sims(split) for net in nets}
    if weight is not None:
        rows["fused"] = weight * rows["global"] + (1 - weight) * rows["local"]
    return rows


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


def write_outputs(args, rows, results, split, labels, output: str) -> None:
    atomic_write_bytes(output, json.dumps(results, indent=2).encode("utf-8"))
    print(f"wrote {output}")
    if args.save_sims:
        for name, sims in rows.items():
            atomic_write(os.path.join(args.save_sims, f"{name}_{split}_sims.npy"), lambda f: np.save(f, sims))
        print(f"wrote similarity matrices to {args.save_sims}")
    if args.plot:
        plot_curves(rows, labels, args.plot)
        print(f"wrote {args.plot}")


@report_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    nets = open_subnetworks(args, resolve_device(args.device))
    check_outputs(args, nets)
    split = pick_split(nets, args.split)
    weight = None
    if len(nets) == 2:
        check_same_items(nets, split)
        weight = tune_weight(nets, args.relevance) if args.tune_fusion else args.fusion_weight
    notes = protocol_notes(nets, split, args.relevance)
    labels = split_labels(nets, split)
    if args.shortlist:
        rows, results = {}, evaluate_shortlist(nets, split, weight, args.shortlist, args.batch_size,
                                               args.save_embeddings, args.map_all, args.relevance)
    else:
        rows = score_rows(nets, split, weight)
        results = {name: retrieval_metrics(sims, *labels, relevance=args.relevance)
                   for name, sims in rows.items()}
    for name in results:
        results[name]["mean_mAP"] = results[name]["rsum"] / 2
    dataset = nets[0].dataset(split)
    print(f"split: {split} ({dataset.describe()}, {nets[0].data_name})"
          + (f", fusion weight w = {weight:.2f}{' (tuned on dev)' if args.tune_fusion else ''}" if weight is not None else ""))
    if args.shortlist:
        print(f"mAP = mAP@{args.shortlist}: AP over each query's top {args.shortlist} (global shortlist, "
              "re-ranked per row), normalised by the relevant items in it")
    print(format_table(results, args.relevance))
    if "mAP@all" in results.get("global", {}):
        full = results["global"]["mAP@all"]
        print(f"global mAP@all over the whole gallery: i2t {full['i2t']['mAP']:.2f}  t2i {full['t2i']['mAP']:.2f}")
    for name, m in results.items():
        for direction in ("i2t", "t2i"):
            if m[direction]["no_relevant"]:
                print(f"notice: {name} {direction}: {m[direction]['no_relevant']} queries have no relevant item "
                      "and are left out of the means")
    output = args.output or os.path.join(os.path.dirname(nets[0].path) or ".", f"eval_{split}.json")
    summary = {"split": split, "data_name": nets[0].data_name, "images": dataset.num_images,
               "captions_per_image": dataset.captions_per_image, "fusion_weight": weight,
               "metric": f"mAP@{args.shortlist}" if args.shortlist else "mAP@all", "relevance": args.relevance,
               **notes,
               "checkpoints": {net.kind: net.path for net in nets}, "rows": results,
               "data": {net.kind: net.provenance for net in nets},
               "checkpoint_sha256": {net.kind: sha256_file(net.path) for net in nets}}
    write_outputs(args, rows, summary, split, protocol_labels(args.relevance, *labels), output)
    return summary


if __name__ == "__main__":
    main()
