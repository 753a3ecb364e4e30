"""Precomputed-feature datasets in the authors' precomp layout (docs/METHOD.md section 1) and their loaders."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from runtime.errors import InputError
from vocab import Vocabulary, read_captions

GRID = 3  # blocks per side of the uniform grid each image is cut into
NUM_BLOCKS = GRID * GRID
MAX_LABEL = 2 ** 53  # the largest whole number float64 labels hold exactly
MAX_CAPTION_WORDS = 100  # default cap on caption length (words), see cap_lengths
MAX_UNKNOWN_FRACTION = 0.5  # above this, the vocabulary belongs to other captions (another dataset)


def split_file(folder: str, split: str, kind: str) -> str:
    """Path of one file of a split: kind is caps, cnns, bovws or labels."""
    return os.path.join(folder, f"{split}_{kind}.txt" if kind == "caps" else f"{split}_{kind}.npy")


def has_split(data_path: str, data_name: str, split: str) -> bool:
    return os.path.isfile(split_file(os.path.join(data_path, data_name), split, "caps"))


def _load_array(path: str, hint: str = "") -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found{hint}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable .npy array ({err})") from None


def read_summary(folder: str) -> dict:
    """prepare_data.py's summary.json of a data folder; {} when absent or unreadable (e.g. the authors' files)."""
    try:
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def class_names(folder: str) -> list[str] | None:
    """Name of each label id (summary.json's label_mapping), or None when the folder does not record them."""
    mapping = read_summary(folder).get("label_mapping")
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
        return None
    return sorted(mapping, key=mapping.get)


def label_names(label: torch.Tensor, names: list[str]) -> str | list[str]:
    """The class name of a label id, or the names of a multi-hot row's classes."""
    if label.dim() == 0:
        return names[int(label)]
    return [names[i] for i in label.nonzero()[:, 0].tolist()]


def _width_hint(path: str, flag: str, width: int) -> str:
    """What the files hold and the flag value they need, from the dataset's summary.json when present."""
    try:
        backbone = read_summary(os.path.dirname(path))["cnn"]["backbone"]
    except (KeyError, TypeError):  # no summary (e.g. the authors' files): just the width
        backbone = None
    held = f"{backbone} features" if flag == "--cnn_dim" and backbone else f"{width}-wide features"
    return f"; the files hold {held}: use {flag} {width}"


def load_features(path: str, granularity: str, dim: int, flag: str, checkpoint: str = "") -> torch.Tensor:
    """Float32 features, (N, dim) for global or (N, 9, dim) for local, all finite; dim is the checkpoint's
    when one is named (evaluation), else the training option `flag`."""
    array = _load_array(path, " (features are built from raw images by prepare_data.py)")
    expected = f"(N, {dim})" if granularity == "global" else f"(N, {NUM_BLOCKS}, {dim})"
    ndim = 2 if granularity == "global" else 3
    if array.ndim != ndim:
        other = "fine-grained (local)" if array.ndim == 3 else "coarse-grained (global)"
        hint = f"; it looks like {other} data" if array.ndim in (2, 3) else ""
        raise InputError(f"{path}: shape {array.shape} has {array.ndim} axes, the {granularity} "
                         f"subnetwork needs {expected}{hint}")
    if granularity == "local" and array.shape[1] != NUM_BLOCKS:
        raise InputError(f"{path}: shape {array.shape}, expected {NUM_BLOCKS} blocks per image {expected}")
    if array.shape[-1] != dim and checkpoint:
        raise InputError(f"{path}: feature width {array.shape[-1]} differs from the {dim} ({flag}) that {checkpoint} "
                         f"was trained on; give the checkpoint trained on these features, or its own data folder")
    if array.shape[-1] != dim:
        raise InputError(f"{path}: feature width {array.shape[-1]} differs from {flag} {dim}"
                         f"{_width_hint(path, flag, array.shape[-1])}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{path}: features must be real numbers, found dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise InputError(f"{path}: {int(bad.sum())} NaN or inf values (first in row {row})")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_labels(path: str) -> torch.Tensor:
    """Integer labels (N,) from (N,) or (N, 1), or a multi-hot (N, C) of 0/1."""
    array = _load_array(path)
    if array.ndim not in (1, 2) or array.size == 0:
        raise InputError(f"{path}: labels must be (N,), (N, 1) or multi-hot (N, C), found shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{path}: labels must be integers, found dtype {array.dtype}")
    wrong = ~np.isfinite(array) | (array != np.round(array)) | (np.abs(array) > MAX_LABEL)
    if wrong.any():  # inf or 1e30 would wrap around in int64 into some other class
        row = int(np.argwhere(wrong)[0][0])
        raise InputError(f"{path}: labels must be integers of magnitude at most {MAX_LABEL}, row {row} holds "
                         f"{array.reshape(len(array), -1)[row].tolist()[:5]}")
    array = array.astype(np.int64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2 and not np.isin(array, (0, 1)).all():
        raise InputError(f"{path}: multi-hot labels (N, C) must hold only 0 and 1")
    return torch.from_numpy(array)


def unknown_rate(captions: list, vocab: Vocabulary) -> tuple[int, int]:
    """(unknown words, words) of encoded captions, <start> and <end> left out."""
    words = sum(len(c) - 2 for c in captions)
    unknown = sum(int((torch.as_tensor(c) == vocab.word2idx["<unk>"]).sum()) for c in captions)
    return unknown, words


def check_known_words(caps_path: str, captions: list[torch.Tensor], vocab: Vocabulary,
                      allow_unknown: bool = False) -> None:
    """Stop when most caption words are <unk> and the vocabulary is foreign to this data too.

    A vocabulary built from the train split (threshold 2) leaves many words of a small, long-tailed test
    split unknown: when the train split of the same folder reads well (at most half unknown) the vocabulary
    is sparse, not foreign, and a notice says so. --allow_unknown_words goes on in every case.
    """
    unknown, words = unknown_rate(captions, vocab)
    if not words or unknown <= MAX_UNKNOWN_FRACTION * words:
        return
    share = f"{unknown} of {words} caption words ({100 * unknown / words:.0f}%) are not in the vocabulary " \
            f"({len(vocab)} entries)"
    train_path = os.path.join(os.path.dirname(caps_path), "train_caps.txt")
    if os.path.basename(caps_path) != "train_caps.txt" and os.path.isfile(train_path):
        train_unknown, train_words = unknown_rate([vocab.encode(c) for c in read_captions(train_path)], vocab)
        if train_words and train_unknown <= MAX_UNKNOWN_FRACTION * train_words:
            print(f"notice: {caps_path}: {share}, against {100 * train_unknown / train_words:.0f}% in the train "
                  "split: a sparse vocabulary (rare words), not a foreign one; scores may suffer",
                  file=sys.stderr, flush=True)
            return
    if allow_unknown:
        print(f"notice: {caps_path}: {share}; going on (--allow_unknown_words)", file=sys.stderr, flush=True)
        return
    raise InputError(f"{caps_path}: {share}; it was built for other captions (another dataset or checkpoint?): "
                     "rebuild it with vocab.py or use the matching one, or add --allow_unknown_words to go on")


def cap_lengths(path: str, encoded: list[list[int]], max_words: int) -> list[torch.Tensor]:
    """Captions as tensors, each cut to max_words words (plus <start> and <end>), with one notice when any is.

    Scoring pads a batch to its longest caption, so one caption of thousands of words would multiply the
    memory and time of all the others (docs/RELIABILITY.md, bounded cost).
    """
    long = [(line, len(ids) - 2) for line, ids in enumerate(encoded, 1) if len(ids) - 2 > max_words]
    if long:
        line, words = max(long, key=lambda item: item[1])
        print(f"notice: {path}: {len(long)} captions longer than --max_caption_words {max_words} are cut to "
              f"{max_words} words (longest: line {line}, {words} words)", file=sys.stderr, flush=True)
    return [torch.tensor(ids if len(ids) - 2 <= max_words else ids[:max_words + 1] + ids[-1:]) for ids in encoded]


class PrecompDataset(Dataset):
    """One split of a precomp folder: N images (CNN and BoVW features, labels) and k·N captions.

    Caption c describes image c // k (k = `captions_per_image`, found from the counts; 1 in the authors'
    Corel 5K layout). Items are captions: `len` is k·N and item c carries its image's features and label.
    """

    def __init__(self, data_path: str, data_name: str, split: str, vocab: Vocabulary,
                 granularity: str, cnn_dim: int, bovw_dim: int, checkpoint: str = "", *,
                 max_words: int = MAX_CAPTION_WORDS, allow_unknown: bool = False):
        folder = os.path.join(data_path, data_name)
        self.folder, self.split = folder, split
        if not os.path.isdir(folder):
            raise InputError(f"{folder}: data folder not found (check --data_path and --data_name)")
        caps_path = split_file(folder, split, "caps")
        self.captions = cap_lengths(caps_path, [vocab.encode(c) for c in read_captions(caps_path)], max_words)
        if not self.captions:
            raise InputError(f"{caps_path}: the split '{split}' is empty")
        check_known_words(caps_path, self.captions, vocab, allow_unknown)
        self.cnns = load_features(split_file(folder, split, "cnns"), granularity, cnn_dim, "--cnn_dim", checkpoint)
        self.bovws = load_features(split_file(folder, split, "bovws"), granularity, bovw_dim, "--bovw_dim", checkpoint)
        self.labels = load_labels(split_file(folder, split, "labels"))
        self.num_images = len(self.labels)
        self.captions_per_image = _captions_per_image(folder, split, self)
        self.caption_labels = self.labels.repeat_interleave(self.captions_per_image, dim=0)

    def label_by_image(self) -> None:
        """Make each image its own label: an item's positives become the captions of its own image."""
        self.labels = torch.arange(self.num_images)
        self.caption_labels = self.labels.repeat_interleave(self.captions_per_image, dim=0)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        image = index // self.captions_per_image
        return self.cnns[image], self.bovws[image], self.captions[index], self.labels[image], index

    def describe(self) -> str:
        """'N images, k·N captions (k per image)'."""
        return f"{self.num_images} images, {len(self.captions)} captions ({self.captions_per_image} per image)"


def _captions_per_image(folder: str, split: str, dataset: PrecompDataset) -> int:
    """k from the counts: features and labels have N rows, the caption file k·N lines."""
    n_caps = len(dataset.captions)
    counts = {split_file(folder, split, "caps"): n_caps}
    for kind in ("cnns", "bovws", "labels"):
        counts[split_file(folder, split, kind)] = len(getattr(dataset, kind))
    image_rows = set(list(counts.values())[1:])
    if len(image_rows) != 1:
        listing = ", ".join(f"{os.path.basename(p)}: {n}" for p, n in counts.items())
        raise InputError(f"{folder}: row counts of split '{split}' disagree ({listing})")
    n_images = image_rows.pop()  # at least 1: load_labels refuses an empty array
    if n_caps % n_images:
        raise InputError(f"{split_file(folder, split, 'caps')}: {n_caps} captions for {n_images} images; the caption "
                         "count must be a whole multiple k·N of the image count (caption j describes image j // k)")
    return n_caps // n_images


def collate(batch: list) -> tuple[torch.Tensor, ...]:
    """Stack a batch sorted by caption length, longest first, captions zero-padded."""
    batch = sorted(batch, key=lambda item: len(item[2]), reverse=True)
    cnns, bovws, captions, labels, ids = zip(*batch)
    lengths = torch.tensor([len(c) for c in captions])
    padded = torch.zeros(len(captions), int(lengths[0]), dtype=torch.long)
    for row, caption in enumerate(captions):
        padded[row, :len(caption)] = caption
    return torch.stack(cnns), torch.stack(bovws), padded, lengths, torch.stack(labels), torch.tensor(ids)


def make_loader(dataset: PrecompDataset, batch_size: int, workers: int = 0,
                batches: list[list[int]] | None = None) -> DataLoader:
    """Loader over given index batches (training order) or in dataset order (evaluation)."""
    if batches is None:
        batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers)


def shuffled_batches(size: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's shuffled index batches (the last one may be smaller)."""
    order = torch.randperm(size, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, size, batch_size)]


def length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                            pool_batches: int) -> list[list[int]]:
    """One epoch's shuffled batches of captions of similar length (--length_buckets).

    The shuffled order is cut into pools of pool_batches batches; each pool is sorted by caption length and
    cut into batches, and the batches are shuffled. Shorter padding makes the GRU and the attention cheaper,
    but batches differ from the released code's uniform ones, and so do the numbers.
    """
    order, pool = torch.randperm(len(lengths), generator=generator).tolist(), pool_batches * batch_size
    batches = []
    for start in range(0, len(order), pool):
        by_length = sorted(order[start:start + pool], key=lengths.__getitem__)
        batches += [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
