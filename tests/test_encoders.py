"""Encoders (encoders.py) against docs/METHOD.md section 3 and the looped references."""
from __future__ import annotations

import math

import pytest
import torch

import encoders
from encoders import TextEncoder, VisualEncoder, l2norm, pool_words
from tests.references import l2norm_reference, pool_words_reference, text_encoder_reference

TOL = 1e-6
VOCAB, WORD_DIM, EMBED = 20, 6, 8
LENGTHS = [5, 3, 7, 2]


def make_captions(lengths: list[int], seed: int, width: int | None = None, pad_value: int | None = 0):
    """(B, width) token ids in 4..VOCAB-1; beyond each length: pad_value, or random ids if None."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    caps = torch.randint(4, VOCAB, (len(lengths), width), generator=g)
    for i, n in enumerate(lengths):
        if pad_value is not None:
            caps[i, n:] = pad_value
    return caps


def text_encoder(bi_gru: bool = True, seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(VOCAB, WORD_DIM, EMBED, 1, bi_gru).double()


# --- l2norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (1, 1)])
def test_l2norm_matches_formula(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = l2norm(x)
    assert out.shape == x.shape
    assert torch.allclose(out, l2norm_reference(x), atol=1e-12, rtol=0)


def test_l2norm_eps_inside_square_and_zero_rows():
    x = torch.tensor([[2e-8, 1e-8], [0.0, 0.0]], dtype=torch.float64)
    out = l2norm(x)
    expected = 2e-8 / math.sqrt((2e-8 + 1e-8) ** 2 + (1e-8 + 1e-8) ** 2)
    assert out[0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(2 / math.sqrt(5), rel=1e-3)   # the eps quirk is visible here
    assert torch.equal(out[1], torch.zeros(2, dtype=torch.float64))
    y = torch.randn(4, 6, dtype=torch.float64)
    assert torch.allclose(l2norm(y, dim=0), l2norm_reference(y.T).T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_l2norm_of_half_precision_is_float32_and_keeps_zero_rows(half):
    x = torch.cat([torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 0.05, torch.zeros(2, 64)])
    out = l2norm(x.to(half))  # --amp: encoder outputs in half precision, padding rows zero
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # float16 once gave 0/0 at zero rows
    assert torch.equal(out[3:], torch.zeros(2, 64))
    assert torch.allclose(out, l2norm_reference(x.to(half).double()).float(), atol=1e-6, rtol=0)


# --- VisualEncoder --------------------------------------------------------------------------

def test_visual_encoder_init_range_and_zero_bias():
    torch.manual_seed(0)
    in_dim, out_dim = 300, 200
    enc = VisualEncoder(in_dim, out_dim)
    w = enc.fc.weight.detach().double()
    r = math.sqrt(6) / math.sqrt(in_dim + out_dim)
    assert w.shape == (out_dim, in_dim)
    assert w.abs().max() <= r
    assert w.abs().max() > 0.99 * r                       # fills the range: not a narrower init
    assert abs(w.mean().item()) < 0.01 * r
    assert w.std().item() == pytest.approx(r / math.sqrt(3), rel=0.02)   # uniform, not normal
    assert torch.equal(enc.fc.bias.detach(), torch.zeros(out_dim))


def test_visual_encoder_unit_output_global_and_blocks():
    torch.manual_seed(1)
    enc = VisualEncoder(12, EMBED).double()
    x = torch.randn(5, 12, dtype=torch.float64)
    out = enc(x)
    assert out.shape == (5, EMBED)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5, dtype=torch.float64), atol=TOL)
    assert torch.allclose(out, l2norm_reference(x @ enc.fc.weight.T + enc.fc.bias), atol=1e-12)
    blocks = torch.randn(4, 9, 12, dtype=torch.float64)
    out_b = enc(blocks)
    assert out_b.shape == (4, 9, EMBED)
    assert torch.allclose(out_b.norm(dim=-1), torch.ones(4, 9, dtype=torch.float64), atol=TOL)
    for i in range(4):      # each block encoded on its own
        assert torch.allclose(out_b[i], enc(blocks[i]), atol=1e-12)


# --- TextEncoder ----------------------------------------------------------------------------

def test_text_encoder_embedding_init():
    torch.manual_seed(3)
    enc = TextEncoder(500, 300, EMBED)
    w = enc.embed.weight.detach()
    assert w.abs().max() <= 0.1 and w.abs().max() > 0.099
    assert w.std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.02)
    assert enc.rnn.bidirectional and enc.rnn.batch_first and enc.rnn.hidden_size == EMBED


def test_text_encoder_shape_padding_and_unit_words():
    enc = text_encoder()
    caps = make_captions(LENGTHS, 0, width=10)            # wider than the longest caption
    out = enc(caps, torch.tensor(LENGTHS))
    assert out.shape == (len(LENGTHS), max(LENGTHS), EMBED)
    for i, n in enumerate(LENGTHS):
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:]))
        assert torch.allclose(out[i, :n].norm(dim=-1), torch.ones(n, dtype=torch.float64), atol=TOL)


def test_word_vectors_independent_of_batch_and_padding():
    enc = text_encoder()
    caps = make_captions(LENGTHS, 1)
    batch = enc(caps, torch.tensor(LENGTHS))
    junk = make_captions(LENGTHS, 1, width=11, pad_value=None)    # same captions, random ids as padding
    junk[:, :max(LENGTHS)] = torch.where(caps > 0, caps, junk[:, :max(LENGTHS)])
    batch_junk = enc(junk, torch.tensor(LENGTHS))
    for i, n in enumerate(LENGTHS):
        alone = enc(caps[i:i + 1, :n], torch.tensor([n]))[0]
        assert alone.shape == (n, EMBED)
        assert torch.allclose(batch[i, :n], alone, atol=1e-12, rtol=0)
        assert torch.allclose(batch_junk[i, :n], alone, atol=1e-12, rtol=0)
    # a different batch-mate does not change caption 0
    other = caps.clone()
    other[1, :LENGTHS[1]] = torch.tensor([4, 5, 6])
    assert torch.allclose(enc(other, torch.tensor(LENGTHS))[0], batch[0], atol=1e-12, rtol=0)


def test_bidirectional_average_matches_manual_gru():
    enc = text_encoder(seed=2)
    caps = make_captions(LENGTHS, 2)
    out = enc(caps, torch.tensor(LENGTHS))
    for i, n in enumerate(LENGTHS):
        # nn.GRU over the true-length sequence only
        seq, _ = enc.rnn(enc.embed(caps[i:i + 1, :n]))
        manual = l2norm_reference((seq[0, :, :EMBED] + seq[0, :, EMBED:]) / 2)
        assert torch.allclose(out[i, :n], manual, atol=1e-12, rtol=0)
        # hand-written GRU equations from the weights
        assert torch.allclose(out[i, :n], text_encoder_reference(enc, caps[i, :n]), atol=TOL, rtol=0)
    # the backward direction really is over the true length: running it over the padded row differs
    seq_pad, _ = enc.rnn(enc.embed(caps[3:4]))
    padded_avg = l2norm_reference((seq_pad[0, :LENGTHS[3], :EMBED] + seq_pad[0, :LENGTHS[3], EMBED:]) / 2)
    assert not torch.allclose(out[3, :LENGTHS[3]], padded_avg, atol=1e-6)


def test_unidirectional_is_forward_only():
    enc = text_encoder(bi_gru=False, seed=4)
    caps = make_captions(LENGTHS, 4)
    out = enc(caps, torch.tensor(LENGTHS))
    for i, n in enumerate(LENGTHS):
        assert torch.allclose(out[i, :n], text_encoder_reference(enc, caps[i, :n]), atol=TOL, rtol=0)


@pytest.mark.parametrize("bi_gru", [True, False])
def test_unpacked_gru_gives_the_values_and_grads_of_packed_sequences(bi_gru, monkeypatch):
    enc = text_encoder(bi_gru=bi_gru, seed=5)
    caps, lengths = make_captions(LENGTHS, 5, width=9, pad_value=None), torch.tensor(LENGTHS)
    projection = torch.randn(len(LENGTHS), max(LENGTHS), EMBED, generator=torch.Generator().manual_seed(6),
                             dtype=torch.float64)

    def values_and_grads():
        out = enc(caps, lengths)
        return [out.detach()] + list(torch.autograd.grad((out * projection).sum(), list(enc.parameters())))
    unpacked = values_and_grads()
    monkeypatch.setattr(encoders, "UNPACKED_GRU_DEVICES", ())
    packed = values_and_grads()
    assert unpacked[0].abs().sum() > 0 and all(g.abs().sum() > 0 for g in packed[1:])
    for fast, slow in zip(unpacked, packed):
        assert torch.allclose(fast, slow, atol=1e-12, rtol=0)


# --- pooling --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["padded_mean", "masked_mean"])
def test_pool_words_matches_reference(mode):
    enc = text_encoder(seed=5)
    caps = make_captions(LENGTHS, 5)
    lengths = torch.tensor(LENGTHS)
    words = enc(caps, lengths)
    pooled = pool_words(words, lengths, mode)
    assert pooled.shape == (len(LENGTHS), EMBED)
    assert torch.allclose(pooled, pool_words_reference(words, LENGTHS, mode), atol=1e-12, rtol=0)


def test_padded_mean_depends_on_batch_longest_masked_mean_does_not():
    enc = text_encoder(seed=6)
    caps = make_captions(LENGTHS, 6)
    words = enc(caps, torch.tensor(LENGTHS))
    n0 = LENGTHS[0]
    alone = enc(caps[:1, :n0], torch.tensor([n0]))
    for mode, scale in (("padded_mean", n0 / max(LENGTHS)), ("masked_mean", 1.0)):
        in_batch = pool_words(words, torch.tensor(LENGTHS), mode)[0]
        by_itself = pool_words(alone, torch.tensor([n0]), mode)[0]
        assert torch.allclose(in_batch, scale * by_itself, atol=1e-12, rtol=0)
    assert n0 != max(LENGTHS)


def test_pool_words_rejects_unknown_mode():
    with pytest.raises(ValueError):
        pool_words(torch.zeros(2, 3, 4), torch.tensor([3, 2]), "max")
