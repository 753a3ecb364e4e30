"""RSICD-sized and paper-sized SYNTHETIC training data for the speed benchmarks, in memory or on disk.

RSICD as trained in the README: batch 64, CNN 1280 (EfficientNet-Lite0), BoVW 500, embedding 128,
word 300, 5 captions per image of 8 to 20 words, train 8,734 / dev 1,094 images, vocabulary 2,026.
The paper's Corel 5K: batch 100, CNN 4096, embedding 1024, one caption of 3 to 7 keywords per image.
Features and words are random: these splits measure time, never accuracy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from data import NUM_BLOCKS, PrecompDataset, collate
from options import parse_options
from vocab import SPECIAL_TOKENS, Vocabulary, save_vocab, vocab_file


@dataclass(frozen=True)
class Shape:
    """Sizes of one training setting."""

    name: str
    batch_size: int
    cnn_dim: int
    bovw_dim: int
    embed_size: int
    word_dim: int
    min_words: int
    max_words: int
    captions_per_image: int
    train_images: int
    dev_images: int
    vocab_size: int
    labels: int

    def train_steps(self) -> int:
        """Batches in one training epoch."""
        return -(-self.train_images * self.captions_per_image // self.batch_size)

    def opt(self, kind: str) -> dict:
        """The training scripts' options at this setting's sizes (defaults otherwise: the paper's loss weights
        and attention settings)."""
        return parse_options(kind, self.flags())

    def flags(self) -> list[str]:
        """The training-script flags of this setting."""
        return ["--batch_size", str(self.batch_size), "--cnn_dim", str(self.cnn_dim), "--bovw_dim",
                str(self.bovw_dim), "--embed_size", str(self.embed_size), "--word_dim", str(self.word_dim)]


RSICD = Shape("rsicd", 64, 1280, 500, 128, 300, 8, 20, 5, 8734, 1094, 2026, 31)
PAPER = Shape("paper", 100, 4096, 500, 1024, 300, 3, 7, 1, 4500, 500, 260, 50)


def _words(shape: Shape) -> list[str]:
    return [f"w{i}" for i in range(shape.vocab_size - len(SPECIAL_TOKENS))]


def vocabulary(shape: Shape) -> Vocabulary:
    return Vocabulary(list(SPECIAL_TOKENS) + _words(shape))


def _random_split(shape: Shape, kind: str, images: int, seed: int) -> dict:
    """Features (global or 3x3 blocks), labels and caption strings of `images` random images."""
    rng = np.random.default_rng(seed)
    blocks = (images, NUM_BLOCKS) if kind == "local" else (images,)
    words = np.array(_words(shape))
    lengths = rng.integers(shape.min_words, shape.max_words + 1, images * shape.captions_per_image)
    return {"cnns": rng.random(blocks + (shape.cnn_dim,), dtype=np.float32),
            "bovws": rng.dirichlet(np.ones(shape.bovw_dim), blocks).astype(np.float32),
            "labels": rng.integers(0, shape.labels, images),
            "captions": [" ".join(rng.choice(words, n)) for n in lengths]}


def in_memory_split(shape: Shape, kind: str, images: int, seed: int = 0) -> PrecompDataset:
    """A PrecompDataset filled from random arrays instead of files (same attributes and items)."""
    arrays = _random_split(shape, kind, images, seed)
    vocab = vocabulary(shape)
    split = PrecompDataset.__new__(PrecompDataset)
    split.folder, split.split = f"<synthetic {shape.name}>", "dev"
    split.captions = [torch.tensor(vocab.encode(c)) for c in arrays["captions"]]
    split.cnns, split.bovws = torch.from_numpy(arrays["cnns"]), torch.from_numpy(arrays["bovws"])
    split.labels = torch.from_numpy(arrays["labels"])
    split.num_images, split.captions_per_image = images, shape.captions_per_image
    split.caption_labels = split.labels.repeat_interleave(shape.captions_per_image)
    return split


def batch_of(split: PrecompDataset, indices: list[int]) -> tuple[torch.Tensor, ...]:
    """One collated training batch, as the loader assembles it."""
    return collate([split[i] for i in indices])


def write_dataset(root: str, shape: Shape, kind: str, sizes: dict[str, int], seed: int = 0) -> dict[str, str]:
    """Write splits in the precomp layout plus the vocabulary; the training-script data flags."""
    folder = os.path.join(root, kind, f"{shape.name}_precomp")
    os.makedirs(folder, exist_ok=True)
    for offset, (split, images) in enumerate(sizes.items()):
        arrays = _random_split(shape, kind, images, seed + offset)
        with open(os.path.join(folder, f"{split}_caps.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(arrays["captions"]) + "\n")
        for name in ("cnns", "bovws", "labels"):
            np.save(os.path.join(folder, f"{split}_{name}.npy"), arrays[name])
    vocab_path = os.path.join(root, "vocab")
    os.makedirs(vocab_path, exist_ok=True)
    save_vocab(vocabulary(shape), vocab_file(vocab_path, f"{shape.name}_precomp"))
    return {"--data_path": os.path.join(root, kind), "--data_name": f"{shape.name}_precomp",
            "--vocab_path": vocab_path}
