"""Shared fixtures: a tiny generated dataset in both granularities, with its vocabulary."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model_factory import untrained_model
from options import parse_options
from runtime.checkpoint import save_checkpoint
from synthetic import generate
from vocab import build_vocab, load_vocab, save_vocab, vocab_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(cnn_dim=24, bovw_dim=12, categories=4)
TINY_MODEL_FLAGS = ["--cnn_dim", "24", "--bovw_dim", "12", "--embed_size", "16", "--word_dim", "8",
                    "--batch_size", "10", "--device", "cpu", "--log_step", "1"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Paths of a 40/20/20-item synthetic dataset (4 categories) and its vocabulary."""
    return make_dataset(str(tmp_path_factory.mktemp("tiny")), "tiny_precomp", {"train": 40, "dev": 20, "test": 20},
                        seed=3)


def make_dataset(root: str, name: str, sizes: dict, seed: int, **options) -> dict:
    """Generate a tiny synthetic dataset under root with its vocabulary (train + dev, threshold 1); its paths."""
    generate(root, name, sizes, seed=seed, **options, **TINY)
    return with_vocab(root, name)


def with_vocab(root: str, name: str) -> dict:
    """Write the vocabulary (train + dev captions, threshold 1) of the dataset `name` under root; its paths."""
    coarse = os.path.join(root, "coarse-grained-data")
    vocab_dir = os.path.join(root, "vocab")
    caps = [os.path.join(coarse, name, f"{s}_caps.txt") for s in ("train", "dev")]
    save_vocab(build_vocab(caps, threshold=1), vocab_file(vocab_dir, name))
    return {"root": root, "coarse": coarse, "fine": os.path.join(root, "fine-grained-data"), "name": name,
            "vocab": vocab_dir}


def train_argv(kind: str, tiny_data: dict, run_dir: str, *extra: str) -> list[str]:
    """Training flags for the tiny dataset, writing logs and checkpoints to run_dir."""
    data = tiny_data["coarse"] if kind == "global" else tiny_data["fine"]
    return ["--data_path", data, "--data_name", tiny_data["name"], "--vocab_path", tiny_data["vocab"],
            "--logger_name", run_dir, "--model_name", run_dir, *TINY_MODEL_FLAGS, *extra]


def run_script(script: str, *args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, capturing its output."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def save_untrained(data: dict, folder, *extra: str) -> dict[str, str]:
    """Checkpoints of freshly initialised tiny subnetworks for data (as tiny_data gives it) in folder; extra:
    more training flags (e.g. other feature widths)."""
    vocab = load_vocab(vocab_file(data["vocab"], data["name"]))
    paths = {}
    for kind in ("global", "local"):
        opt = parse_options(kind, train_argv(kind, data, str(folder), *extra))
        model = untrained_model(kind, opt, len(vocab))
        paths[kind] = os.path.join(str(folder), f"{kind}.pth.tar")
        save_checkpoint({"kind": kind, "model": model.state_dict(), "opt": opt, "vocab": vocab.word2idx,
                         "epoch": 0}, paths[kind])
    return paths


@pytest.fixture(scope="session")
def untrained(tiny_data, tmp_path_factory) -> dict[str, str]:
    """Untrained checkpoints of the tiny dataset (evaluation and search do not need training)."""
    return save_untrained(tiny_data, tmp_path_factory.mktemp("untrained"))
