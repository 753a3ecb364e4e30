"""Property-based tests: tokenizer, vocabulary and collate on arbitrary Unicode; MSB loss on random labels."""
from __future__ import annotations

import os
import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.tokenize import word_tokenize

from data import collate
from loss import msb_loss
from vocab import build_vocab, tokenize

captions = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=40)
nonempty = captions.filter(lambda c: len(tokenize(c)) > 0)


@given(captions)
def test_tokens_are_nonempty_and_without_spaces(caption):
    tokens = tokenize(caption)
    assert all(t and t == t.strip() and " " not in t for t in tokens)
    # docs/METHOD.md section 2: the same tokens as NLTK's word_tokenize
    assert tokens == word_tokenize(caption.lower(), preserve_line=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(nonempty, min_size=1, max_size=12), st.integers(1, 3))
def test_vocabulary_round_trip(lines, threshold):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "train_caps.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        vocab = build_vocab([path], threshold)
    counts: dict[str, int] = {}
    for line in lines:
        for token in tokenize(line):
            counts[token] = counts.get(token, 0) + 1
    for line in lines:
        ids = vocab.encode(line)
        assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(tokenize(line)) + 2
        for token, index in zip(tokenize(line), ids[1:-1]):
            kept = counts[token] >= threshold and token not in ("<pad>", "<start>", "<end>", "<unk>")
            assert (vocab.idx2word[index] == token) if kept else index in (3, vocab.word2idx.get(token, 3))


@given(st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=9), min_size=1, max_size=8))
def test_collate_keeps_every_caption(token_lists):
    batch = [(torch.zeros(3), torch.zeros(2), torch.tensor(t), torch.tensor(i % 3), i)
             for i, t in enumerate(token_lists)]
    _, _, padded, lengths, _, ids = collate(batch)
    assert torch.all(lengths[:-1] >= lengths[1:]) and padded.shape == (len(batch), max(map(len, token_lists)))
    for row, i in enumerate(ids.tolist()):
        assert padded[row, :lengths[row]].tolist() == token_lists[i] and not padded[row, lengths[row]:].any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(0.1, 20.0))
def test_msb_loss_is_finite_with_finite_gradients(batch, labels, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    sims = ((torch.rand(batch, batch, generator=gen) * 2 - 1) * scale).requires_grad_()
    y = torch.randint(0, labels, (batch,), generator=gen)
    loss = msb_loss(sims, y)
    loss.backward()
    assert torch.isfinite(loss) and loss.requires_grad
    assert torch.isfinite(sims.grad).all()
