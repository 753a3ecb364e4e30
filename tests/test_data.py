"""Dataset loading, validation messages and collate (docs/METHOD.md section 1)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from data import PrecompDataset, collate, length_bucketed_batches, make_loader, shuffled_batches
from runtime.errors import InputError
from vocab import load_vocab, vocab_file


@pytest.fixture
def vocab(tiny_data):
    return load_vocab(vocab_file(tiny_data["vocab"], tiny_data["name"]))


@pytest.fixture
def copy_of(tiny_data, tmp_path):
    """A writable copy of one granularity of the tiny dataset; returns (data_path, folder)."""
    def make(granularity: str) -> tuple[str, str]:
        src = os.path.join(tiny_data[granularity], tiny_data["name"])
        dst = tmp_path / granularity / tiny_data["name"]
        shutil.copytree(src, dst)
        return str(tmp_path / granularity), str(dst)
    return make


def load(data_path, vocab, granularity="global", split="train", cnn_dim=24, bovw_dim=12):
    return PrecompDataset(data_path, "tiny_precomp", split, vocab, granularity, cnn_dim, bovw_dim)


@pytest.mark.parametrize("granularity,key,shape", [("global", "coarse", (24,)), ("local", "fine", (9, 24))])
def test_loads_both_granularities(tiny_data, vocab, granularity, key, shape):
    ds = load(tiny_data[key], vocab, granularity)
    cnn, bovw, caption, label, index = ds[3]
    assert len(ds) == 40 and tuple(cnn.shape) == shape and cnn.dtype == torch.float32
    assert bovw.shape[-1] == 12 and index == 3 and label.dim() == 0
    assert caption[0] == vocab("<start>") and caption[-1] == vocab("<end>")


def test_collate_sorts_by_length_and_pads(tiny_data, vocab):
    ds = load(tiny_data["coarse"], vocab)
    cnn, bovw, caps, lengths, labels, ids = collate([ds[i] for i in range(10)])
    assert torch.all(lengths[:-1] >= lengths[1:])
    assert caps.shape == (10, int(lengths[0]))
    for row, i in enumerate(ids.tolist()):
        assert torch.equal(caps[row, :lengths[row]], ds.captions[i])
        assert torch.all(caps[row, lengths[row]:] == 0)
        assert torch.equal(cnn[row], ds.cnns[i]) and labels[row] == ds.labels[i]


def test_loader_covers_every_item_once(tiny_data, vocab):
    ds = load(tiny_data["coarse"], vocab)
    batches = shuffled_batches(len(ds), 7, torch.Generator().manual_seed(0))
    seen = torch.cat([b[-1] for b in make_loader(ds, 7, batches=batches)])
    assert sorted(seen.tolist()) == list(range(40))
    assert [len(b) for b in batches] == [7] * 5 + [5]


def padded_words(batches: list[list[int]], lengths: list[int]) -> int:
    """Word slots the GRU and the attention compute over: each batch padded to its longest caption."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_length_buckets_cover_every_item_once_with_less_padding() -> None:
    lengths = torch.randint(3, 30, (1000,), generator=torch.Generator().manual_seed(1)).tolist()
    uniform = shuffled_batches(1000, 32, torch.Generator().manual_seed(2))
    bucketed = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(2), pool_batches=8)
    assert sorted(sum(bucketed, [])) == list(range(1000))
    assert sorted(map(len, bucketed)) == [8] + [32] * 31  # as many full batches as uniform batching gives
    assert padded_words(bucketed, lengths) < 0.75 * padded_words(uniform, lengths)
    again = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(2), pool_batches=8)
    assert again == bucketed  # drawn from the order RNG alone: a resumed epoch redraws the same batches
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(2)).tolist()  # the pools: 8 x 32 items
    pool_of = {item: position // 256 for position, item in enumerate(order)}
    assert all(len({pool_of[i] for i in batch}) == 1 for batch in bucketed)  # each batch from one pool
    longest = [max(lengths[i] for i in batch) for batch in bucketed]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # batch order shuffled


@pytest.mark.parametrize("labels", [lambda y: y[:, None], lambda y: np.eye(4, dtype=np.int64)[y],
                                    lambda y: y.astype(np.float32)])
def test_label_forms(copy_of, vocab, labels):
    data_path, folder = copy_of("coarse")
    path = os.path.join(folder, "train_labels.npy")
    y = np.load(path)
    np.save(path, labels(y))
    got = load(data_path, vocab).labels
    assert got.dtype == torch.int64
    assert torch.equal(got if got.dim() == 1 else got.argmax(1), torch.from_numpy(y))


def corrupt(folder, name, array):
    np.save(os.path.join(folder, name), array)


CASES = {
    "missing file": (lambda f: os.remove(os.path.join(f, "train_bovws.npy")), "train_bovws.npy", "not found"),
    "rows disagree": (lambda f: corrupt(f, "train_labels.npy", np.zeros(39, np.int64)), "train", "disagree"),
    "wrong axes": (lambda f: corrupt(f, "train_cnns.npy", np.zeros((40, 9, 24), np.float32)),
                   "train_cnns.npy", "axes"),
    "wrong width": (lambda f: corrupt(f, "train_bovws.npy", np.zeros((40, 13), np.float32)),
                    "train_bovws.npy", "--bovw_dim"),
    "nan": (lambda f: corrupt(f, "train_cnns.npy", np.full((40, 24), np.nan, np.float32)), "train_cnns.npy", "NaN"),
    "inf": (lambda f: corrupt(f, "train_bovws.npy", np.full((40, 12), np.inf, np.float32)), "train_bovws.npy", "inf"),
    "float labels": (lambda f: corrupt(f, "train_labels.npy", np.linspace(0, 1, 40)), "train_labels.npy", "integers"),
    "string labels": (lambda f: corrupt(f, "train_labels.npy", np.array(["a"] * 40)), "train_labels.npy", "integers"),
    "empty caption": (lambda f: open(os.path.join(f, "train_caps.txt"), "a").write("\n \nlast\n"),
                      "train_caps.txt", "empty caption"),
    "missing captions": (lambda f: os.remove(os.path.join(f, "train_caps.txt")), "train_caps.txt", "not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_names_file_and_problem(copy_of, vocab, case):
    damage, file_part, problem = CASES[case]
    data_path, folder = copy_of("coarse")
    damage(folder)
    with pytest.raises(InputError) as err:
        load(data_path, vocab)
    assert file_part in str(err.value) and problem in str(err.value)


def test_local_features_given_to_global_and_reverse(tiny_data, vocab):
    with pytest.raises(InputError, match="fine-grained"):
        load(tiny_data["fine"], vocab, "global")
    with pytest.raises(InputError, match="coarse-grained"):
        load(tiny_data["coarse"], vocab, "local")


def test_empty_split(copy_of, vocab):
    data_path, folder = copy_of("coarse")
    open(os.path.join(folder, "train_caps.txt"), "w").close()
    for name, shape in (("cnns", (0, 24)), ("bovws", (0, 12))):
        corrupt(folder, f"train_{name}.npy", np.zeros(shape, np.float32))
    corrupt(folder, "train_labels.npy", np.zeros(0, np.int64))
    with pytest.raises(InputError, match="train_caps.txt: the split .train. is empty"):
        load(data_path, vocab)
