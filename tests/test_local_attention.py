"""Batched local attention (model_local) against the looped reference (tests/reference_local)."""
from __future__ import annotations

import pytest
import torch

import attention_kernel
import model_local
from data import NUM_BLOCKS
from loss import msb_loss
from model_local import ATTENTION_NORMS, LocalModel, cross_attention, paired_attention, text_to_image_attention
from tests.reference_local import (reference_attention_weights, reference_cross_attention, reference_forward,
                                   reference_text_image)

TOL = 1e-6
CAPTION_LENGTHS = [3, 8, 5, 6, 4]
EMBED = 16
OPT = {"cnn_dim": 12, "bovw_dim": 10, "embed_size": EMBED, "word_dim": 8, "num_layers": 1,
       "bi_gru": True, "raw_feature_norm": "clipped_l2norm", "lambda_softmax": 9.0,
       "beta_1": 0.4, "beta_2": 0.4}
VOCAB = 30


def unit_fragments(n: int, length: int, lengths: list[int] | None = None, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random L2-normalised fragments (n, length, EMBED), zero beyond each true length."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, length, EMBED, generator=g, dtype=dtype), dim=-1)
    if lengths is not None:
        for i, true_len in enumerate(lengths):
            x[i, true_len:] = 0
    return x


def words() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor(CAPTION_LENGTHS)
    return unit_fragments(len(CAPTION_LENGTHS), max(CAPTION_LENGTHS), CAPTION_LENGTHS, seed=1), lengths


def blocks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return unit_fragments(n, NUM_BLOCKS, seed=seed), torch.full((n,), NUM_BLOCKS)


DIRECTIONS = {  # name -> (query, context): t2i queries words over blocks, c2b CNN over BoVW, ...
    "t2i": lambda: (words(), blocks(4, seed=2)),
    "i2t": lambda: (blocks(4, seed=2), words()),
    "c2b": lambda: (blocks(4, seed=3), blocks(5, seed=4)),
    "b2c": lambda: (blocks(5, seed=4), blocks(4, seed=3)),
}


@pytest.fixture(params=["fused kernel", "tensor ops"])
def attention_path(request, monkeypatch) -> str:
    """Both forms of the L2-norm attention: the fused CPU kernel and the tensor-op form without it."""
    if request.param == "tensor ops":
        monkeypatch.setattr(model_local, "_kernel_serves", lambda device: False)
    return request.param


def values_and_grads(fn, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn(*inputs) and the grads of a fixed random projection of it w.r.t. the inputs."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return out.detach(), list(torch.autograd.grad((out * projection).sum(), inputs))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < tol


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cross_attention_matches_reference(direction: str, norm: str, attention_path: str) -> None:
    (query, query_lengths), (context, context_lengths) = DIRECTIONS[direction]()

    def run(attend):
        return values_and_grads(
            lambda q, c: attend(q, query_lengths, c, context_lengths, norm, 9.0), [query, context])

    fast, fast_grads = run(cross_attention)
    slow, slow_grads = run(reference_cross_attention)
    assert_close(fast, slow)
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        assert_close(fast_grad, slow_grad)


@pytest.mark.parametrize("slice_elements", [1, 800, 1100])  # 1, 2 and 3 images a slice
def test_slicing_does_not_change_values_or_grads(slice_elements: int, monkeypatch) -> None:
    (words_, word_lengths), (images, image_lengths) = DIRECTIONS["t2i"]()

    def both_attentions(w: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.cat([cross_attention(w, word_lengths, i, image_lengths),
                          paired_attention(i, image_lengths, w, word_lengths).T])

    whole, whole_grads = values_and_grads(both_attentions, [words_, images])
    monkeypatch.setattr(model_local, "SLICE_ELEMENTS", slice_elements)
    sliced, sliced_grads = values_and_grads(both_attentions, [words_, images])
    assert_close(sliced, whole, 1e-12)
    for sliced_grad, whole_grad in zip(sliced_grads, whole_grads):
        assert_close(sliced_grad, whole_grad, 1e-12)


@pytest.mark.parametrize("slice_elements", [model_local.SLICE_ELEMENTS, 1])  # 1: one image a slice, in every group
@pytest.mark.parametrize("longest_first", [False, True])  # True: sorted as data.collate sorts a batch
@pytest.mark.parametrize("norm", ATTENTION_NORMS)
@pytest.mark.parametrize("column_group", [1, 2, 3])
def test_caption_groups_give_the_reference_values_and_grads(column_group: int, norm: str, longest_first: bool,
                                                            slice_elements: int, monkeypatch,
                                                            attention_path: str) -> None:
    (words_, word_lengths), (images, image_lengths) = DIRECTIONS["t2i"]()
    if longest_first:
        order = torch.argsort(word_lengths, descending=True, stable=True)
        words_, word_lengths = words_[order], word_lengths[order]
    monkeypatch.setattr(model_local, "COLUMN_GROUP", column_group)
    monkeypatch.setattr(model_local, "SLICE_ELEMENTS", slice_elements)
    grouped, grouped_grads = values_and_grads(
        lambda w, i: paired_attention(i, image_lengths, w, word_lengths, norm), [words_, images])
    expected, expected_grads = values_and_grads(
        lambda w, i: reference_text_image(i, w, word_lengths, norm), [words_, images])
    assert_close(grouped, expected)
    for grouped_grad, expected_grad in zip(grouped_grads, expected_grads):
        assert_close(grouped_grad, expected_grad)


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
def test_non_contiguous_fragments_give_the_reference_values_and_grads(norm: str, attention_path: str) -> None:
    (words_, word_lengths), (images, image_lengths) = DIRECTIONS["t2i"]()

    def strided(x: torch.Tensor) -> torch.Tensor:
        """x's values in a layout with the items not contiguous (a transposed copy viewed back)."""
        return x.transpose(0, 1).contiguous().transpose(0, 1)

    assert not strided(images).is_contiguous() and not strided(words_).is_contiguous()
    grouped, grouped_grads = values_and_grads(
        lambda w, i: paired_attention(strided(i), image_lengths, strided(w), word_lengths, norm), [words_, images])
    expected, expected_grads = values_and_grads(
        lambda w, i: reference_text_image(i, w, word_lengths, norm), [words_, images])
    assert_close(grouped, expected)
    for grouped_grad, expected_grad in zip(grouped_grads, expected_grads):
        assert_close(grouped_grad, expected_grad)


def test_column_groups_follow_the_batch_order_and_pack_each_group_to_its_longest(monkeypatch) -> None:
    monkeypatch.setattr(model_local, "COLUMN_GROUP", 2)

    def packing(groups: model_local.ColumnGroups, lengths: list[int], padded_len: int) -> tuple[list, list]:
        """The kernel's packed rows of the flat columns and their weights (csrc/paired_groups.cpp)."""
        index, weight = attention_kernel.load().column_packing(torch.tensor(lengths), groups.order,
                                                               groups.kernel_bounds(row_len=1), padded_len)
        return index.tolist(), weight.tolist()

    same = model_local.ColumnGroups.of(torch.tensor([4, 4, 4]))
    assert same.order is None and same.bounds == [(0, 3, 4)]  # equal lengths: one group whatever its size
    index, weight = packing(same, [4, 4, 4], 4)  # position-major: position 0 of each column, ...
    assert index == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11] and weight == [True] * 12
    longest_first = model_local.ColumnGroups.of(torch.tensor([5, 3, 3, 2, 1]))
    assert longest_first.order is None and longest_first.bounds == [(0, 2, 5), (2, 4, 3), (4, 5, 1)]
    index, weight = packing(longest_first, [5, 3, 3, 2, 1], 5)
    assert index == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9] + [10, 15, 11, 16, 12, 17] + [20]
    assert weight == [True] * 6 + [True, False] * 2 + [True] * 5 + [False] + [True]
    shuffled = model_local.ColumnGroups.of(torch.tensor([3, 1, 2]))  # other orders: shortest first
    assert shuffled.order.tolist() == [1, 2, 0] and shuffled.bounds == [(0, 2, 2), (2, 3, 3)]
    index, weight = packing(shuffled, [3, 1, 2], 3)
    assert index == [3, 6, 4, 7, 0, 1, 2] and weight == [True, True, False, True, True, True, True]


def model_batch(seed: int = 0, dtype: torch.dtype = torch.float64):
    """cnn, bovw, captions (with padding ids) and lengths for the CAPTION_LENGTHS batch."""
    g = torch.Generator().manual_seed(seed)
    n = len(CAPTION_LENGTHS)
    cnn = torch.rand(n, NUM_BLOCKS, OPT["cnn_dim"], generator=g, dtype=dtype)
    bovw = torch.rand(n, NUM_BLOCKS, OPT["bovw_dim"], generator=g, dtype=dtype)
    captions = torch.randint(4, VOCAB, (n, max(CAPTION_LENGTHS)), generator=g)
    lengths = torch.tensor(CAPTION_LENGTHS)
    captions[torch.arange(captions.size(1))[None, :] >= lengths[:, None]] = 0
    return cnn, bovw, captions, lengths


def make_model(norm: str = "clipped_l2norm", dtype: torch.dtype = torch.float64) -> LocalModel:
    torch.manual_seed(0)
    return LocalModel({**OPT, "raw_feature_norm": norm}, VOCAB).to(dtype)


def projected_param_grads(sims: torch.Tensor, params: list[torch.Tensor]) -> tuple:
    """Grads w.r.t. params of a fixed random projection of sims; the graph is kept for reuse."""
    projection = torch.randn(sims.shape, generator=torch.Generator().manual_seed(8), dtype=sims.dtype)
    return torch.autograd.grad((sims * projection).sum(), params, retain_graph=True, allow_unused=True)


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
def test_forward_matches_reference(norm: str, attention_path: str) -> None:
    model = make_model(norm)
    batch = model_batch()
    fast, slow = model(*batch), reference_forward(model, *batch)
    params = list(model.parameters())
    for key in ("P", "A1", "A2"):
        assert_close(fast[key], slow[key])
        for fast_grad, slow_grad in zip(projected_param_grads(fast[key], params),
                                        projected_param_grads(slow[key], params)):
            assert (fast_grad is None) == (slow_grad is None)
            if fast_grad is not None:
                assert_close(fast_grad, slow_grad)


def with_garbage_padding(x: torch.Tensor, lengths: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """x with extra positions appended and random values everywhere beyond the true lengths."""
    padded = torch.cat([x, torch.zeros_like(x[:, :extra])], dim=1)
    g = torch.Generator().manual_seed(9)
    for i, true_len in enumerate(lengths.tolist()):
        padded[i, true_len:] = 5 * torch.randn(padded.size(1) - true_len, x.size(2), generator=g,
                                               dtype=x.dtype)
    return padded


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_padding_does_not_change_scores(direction: str, norm: str) -> None:
    (query, query_lengths), (context, context_lengths) = DIRECTIONS[direction]()
    expected = cross_attention(query, query_lengths, context, context_lengths, norm)
    padded = cross_attention(with_garbage_padding(query, query_lengths), query_lengths,
                             with_garbage_padding(context, context_lengths), context_lengths, norm)
    assert_close(padded, expected, 1e-12)


def primary_embeddings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 images and 11 captions of mixed lengths, as block and word embeddings."""
    lengths = torch.tensor([3, 8, 5, 6, 4, 3, 7, 8, 5, 4, 6])
    return (unit_fragments(7, NUM_BLOCKS, seed=6), unit_fragments(len(lengths), 10, lengths.tolist(), seed=7),
            lengths)


def test_primary_similarity_matches_reference() -> None:
    images, texts, lengths = primary_embeddings()
    image_lengths = torch.full((len(images),), NUM_BLOCKS)
    expected = (reference_cross_attention(texts, lengths, images, image_lengths).T
                + reference_cross_attention(images, image_lengths, texts, lengths))
    assert_close(make_model().primary_similarity(images, texts, lengths), expected)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 6, 1000])
def test_chunked_primary_similarity_equals_unchunked(chunk: int) -> None:
    model = make_model()
    images, texts, lengths = primary_embeddings()
    whole = model.primary_similarity(images, texts, lengths, chunk=100_000)
    assert_close(model.primary_similarity(images, texts, lengths, chunk=chunk), whole, 1e-12)


def test_float32_forward_agrees_with_float64() -> None:
    batch64 = model_batch()
    batch32 = [x.float() if x.is_floating_point() else x for x in batch64]
    out64 = make_model()(*batch64)
    out32 = make_model(dtype=torch.float32)(*batch32)
    for key in ("P", "A1", "A2"):
        assert out32[key].dtype == torch.float32
        assert_close(out32[key].double(), out64[key], 1e-4)


def test_msb_loss_backpropagates_into_all_encoders() -> None:
    model = make_model(dtype=torch.float32)
    cnn, bovw, captions, lengths = model_batch(dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2])
    sims = model(cnn, bovw, captions, lengths)
    weights = model.loss_weights()
    assert weights == {"P": 1.0, "A1": 0.4, "A2": 0.4}
    loss = sum(weights[key] * msb_loss(sims[key], labels) for key in sims)
    loss.backward()
    for name in ("img_cnn", "img_bovw", "txt_cnn", "txt_bovw"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
def test_text_to_image_attention_matches_reference(norm: str) -> None:
    caption = unit_fragments(1, 6, seed=7)[0]
    image = unit_fragments(1, NUM_BLOCKS, seed=8)[0]
    weights = text_to_image_attention(caption, image, norm, 9.0)
    assert weights.shape == (6, NUM_BLOCKS)
    assert_close(weights, reference_attention_weights(caption, image, norm, 9.0))
    assert_close(weights.sum(dim=1), torch.ones(6, dtype=torch.float64))
    assert weights.max() > 1.5 / NUM_BLOCKS  # not uniform: the attention prefers some blocks


def test_unknown_norm_is_rejected() -> None:
    with pytest.raises(ValueError):
        LocalModel({**OPT, "raw_feature_norm": "l1"}, VOCAB)
