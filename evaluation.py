"""Trained subnetworks opened with the data they read, as evaluate.py, visualize.py and search.py use them.

SubnetworkConfig holds the flags the three commands share (add_subnetwork_arguments); open_split opens the
checkpoints, picks the split, checks that two subnetworks read the same items and takes the fusion weight.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields
from typing import TextIO

import numpy as np
import torch

from data import MAX_CAPTION_WORDS, PrecompDataset, has_split
from metrics import RELEVANCE, retrieval_metrics
from model_factory import load_trained
from runtime.device import resolve_device
from runtime.errors import InputError, check_number
from runtime.files import read_utf8
from runtime.provenance import data_fingerprint, describe_change
from scoring import similarity_matrix

FUSION_GRID = np.round(np.arange(0.0, 1.0001, 0.05), 2)


@dataclass(frozen=True)
class SubnetworkConfig:
    """The checkpoints, their data, the split, fusion, scoring and device (the flags of add_subnetwork_arguments,
    whose defaults are these)."""

    global_ckpt: str = ""
    local_ckpt: str = ""
    data_path: str = ""  # when one checkpoint is given; "": the checkpoint's own
    global_data_path: str = ""
    local_data_path: str = ""
    data_name: str = ""  # "": the checkpoint's
    split: str = "test"
    fusion_weight: float = 0.5
    chunk: int = 1000
    batch_size: int = 0  # 0: the checkpoint's
    device: str = "auto"
    relevance: str = "label"
    allow_unknown_words: bool = False

    @classmethod
    def from_flags(cls, args: argparse.Namespace):
        """The configuration of parsed flags: one field per flag of the same name."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


def add_subnetwork_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """Flags shared by evaluate.py, visualize.py and search.py: checkpoints, their data, split, fusion, device."""
    d = SubnetworkConfig()
    p.add_argument("--global_ckpt", default=d.global_ckpt, help="checkpoint of train_global.py")
    p.add_argument("--local_ckpt", default=d.local_ckpt, help="checkpoint of train_local.py")
    p.add_argument("--data_path", default=d.data_path, help="data folder when one checkpoint is given "
                   "(default: the checkpoint's own)")
    p.add_argument("--global_data_path", default=d.global_data_path,
                   help="coarse-grained data folder (default: the checkpoint's)")
    p.add_argument("--local_data_path", default=d.local_data_path,
                   help="fine-grained data folder (default: the checkpoint's)")
    p.add_argument("--data_name", default=d.data_name, help="dataset name (default: the checkpoint's)")
    p.add_argument("--split", default=d.split, help=f"split to {verb}; test falls back to dev when absent")
    p.add_argument("--fusion_weight", type=float, default=d.fusion_weight, help="w in w * global + (1 - w) * local")
    p.add_argument("--chunk", type=int, default=d.chunk, help="images / captions per block of local scoring")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="encoding batch (default: the checkpoint's)")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--relevance", choices=RELEVANCE, default=d.relevance,
                   help="label: relevant = shared label (the paper's); instance: caption j is relevant only "
                        "to image j // k (the field's R@K protocol)")
    p.add_argument("--allow_unknown_words", action="store_true",
                   help="go on when most caption words are outside the checkpoint's vocabulary")


def check_subnetwork_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags of add_subnetwork_arguments in range (NaN included), before any checkpoint is read."""
    if not 0.0 <= args.fusion_weight <= 1.0:  # False for NaN too
        p.error("--fusion_weight must lie in [0, 1]")
    check_number("--chunk", args.chunk, minimum=1)
    check_number("--batch_size", args.batch_size, minimum=0)


class Subnetwork:
    """A trained subnetwork with the data it reads; scores splits on demand, once each."""

    def __init__(self, kind: str, path: str, data_path: str, config: SubnetworkConfig, device: torch.device,
                 out: TextIO | None = None):
        """out: the stream of the data notices (default stdout; search.py --json: stderr, stdout is JSON)."""
        self.kind, self.path, self.device = kind, path, device
        self.model, ckpt, self.vocab = load_trained(path, kind, device)
        self.opt = ckpt["opt"]
        self.training_data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else None
        self.data_path = data_path or self._training_data_path()
        self.data_name = config.data_name or self.opt["data_name"]
        self.batch_size = config.batch_size or self.opt["batch_size"]  # of encoding
        self.chunk = config.chunk
        self.allow_unknown_words = config.allow_unknown_words
        self.max_words = int(self.opt.get("max_caption_words", MAX_CAPTION_WORDS))  # as in training
        self.out = out or sys.stdout
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
                                                  allow_unknown=self.allow_unknown_words)
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
            self._sims[split] = similarity_matrix(self.model, self.dataset(split), self.batch_size, self.device,
                                                  chunk=self.chunk)
        return self._sims[split]


def open_subnetworks(config: SubnetworkConfig, device: torch.device, out: TextIO | None = None) -> list[Subnetwork]:
    """The given subnetworks, the global one first; two must share their vocabulary."""
    both = bool(config.global_ckpt and config.local_ckpt)
    nets = []
    for kind, path, own_path in (("global", config.global_ckpt, config.global_data_path),
                                 ("local", config.local_ckpt, config.local_data_path)):
        if path:
            nets.append(Subnetwork(kind, path, own_path or ("" if both else config.data_path), config, device, out))
    if both and nets[0].vocab.word2idx != nets[1].vocab.word2idx:
        raise InputError(f"{config.global_ckpt} and {config.local_ckpt} were trained on different vocabularies; "
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



@dataclass
class OpenedSplit:
    """Subnetworks (the global one first) ready to score a split, with the fusion weight when there are two."""

    nets: list[Subnetwork]
    split: str
    weight: float | None


def open_split(config: SubnetworkConfig, tune_fusion: bool = False, out: TextIO | None = None) -> OpenedSplit:
    """Open the checkpoints, pick the split (test falls back to dev), check that two subnetworks read the same
    items and take the fusion weight: the given one, or the best on dev when tune_fusion; out: the stream of
    the data notices (default stdout)."""
    nets = open_subnetworks(config, resolve_device(config.device), out)
    split = pick_split(nets, config.split)
    weight = None
    if len(nets) == 2:
        check_same_items(nets, split)
        weight = tune_weight(nets, config.relevance) if tune_fusion else config.fusion_weight
    return OpenedSplit(nets, split, weight)
