"""The compiled CPU kernels against the tensor-op forms they replace: the fused attention (csrc/l2_attention.cpp,
csrc/paired_groups.cpp) and the MSB loss (csrc/msb_loss.cpp)."""
from __future__ import annotations

import pytest
import torch

import attention_kernel
import loss
import model_local
from metrics import relevance
from model_local import Fragments, _FusedL2Attention, _L2Attention, _raw_scores
from tests.test_local_attention import unit_fragments
from tests.test_loss import skipped_anchor_batch


def padded_fragments(lengths: list[int], seed: int) -> Fragments:
    """Random unit fragments with these true lengths, prepared for attention."""
    return Fragments.of(unit_fragments(len(lengths), max(lengths), lengths, seed=seed), torch.tensor(lengths))


def values_and_grads(function, context: Fragments, query: Fragments, clipped: bool):
    raw = _raw_scores(context.vectors, query.vectors).requires_grad_()
    gram, sq_norms = context.gram.clone().requires_grad_(), query.sq_norms.clone().requires_grad_()
    out = function.apply(raw, gram, sq_norms, query.mask, context.mask, clipped, 9.0)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return [out, *torch.autograd.grad((out * projection).sum(), [raw, gram, sq_norms])]


def kernel_both_ways(paired: bool, rows: Fragments, cols: Fragments, clipped: bool,
                     position_major: bool = False) -> list[torch.Tensor]:
    """The kernel's att(Q = col, C = row) + att(Q = row, C = col) and the gradients of the raw scores, both Grams
    and both norms for a fixed projection: from one paired call (on raw scores stored column-major, or
    position-major as the model's packed columns give them), or from two single-direction calls on the raw scores
    and their transposed copy."""
    kernel, raw = attention_kernel.load(), _raw_scores(rows.vectors, cols.vectors)
    row_weight, col_weight = rows.mask.to(raw.dtype), cols.mask.to(raw.dtype)
    if paired:
        raw = raw.transpose(2, 3).contiguous().transpose(2, 3) if position_major else raw
        out, *state = kernel.paired_forward(raw, rows.gram, cols.gram, rows.sq_norms, cols.sq_norms, row_weight,
                                            col_weight, clipped, 9.0, True)
        projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
        grads = kernel.paired_backward(projection, raw, rows.sq_norms, cols.sq_norms, row_weight, col_weight,
                                       state[:5], state[5:], clipped, 9.0)
        assert grads[0].stride() == raw.stride()  # dL/draw comes in raw's layout
        return [out, *grads]
    transposed = raw.permute(2, 3, 0, 1).contiguous()
    first, *first_state = kernel.forward(raw, rows.gram, cols.sq_norms, col_weight, row_weight, clipped, 9.0, True)
    second, *second_state = kernel.forward(transposed, cols.gram, rows.sq_norms, row_weight, col_weight, clipped, 9.0,
                                           True)
    out = first + second.T
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grad_raw, grad_row_gram, grad_col_sq = kernel.backward(projection, raw, cols.sq_norms, col_weight, *first_state,
                                                           clipped, 9.0)
    grad_transposed, grad_col_gram, grad_row_sq = kernel.backward(projection.T, transposed, rows.sq_norms, row_weight,
                                                                  *second_state, clipped, 9.0)
    return [out, grad_raw + grad_transposed.permute(2, 3, 0, 1), grad_row_gram, grad_col_gram, grad_row_sq, grad_col_sq]


def tensor_op_both_ways(rows: Fragments, cols: Fragments, clipped: bool) -> list[torch.Tensor]:
    """kernel_both_ways computed by the tensor-op form (_L2Attention, one direction at a time, autograd)."""
    raw = _raw_scores(rows.vectors, cols.vectors).requires_grad_()
    grams = [fragments.gram.clone().requires_grad_() for fragments in (rows, cols)]
    sq_norms = [fragments.sq_norms.clone().requires_grad_() for fragments in (rows, cols)]
    out = (_L2Attention.apply(raw, grams[0], sq_norms[1], cols.mask, rows.mask, clipped, 9.0)
           + _L2Attention.apply(raw.permute(2, 3, 0, 1), grams[1], sq_norms[0], rows.mask, cols.mask, clipped, 9.0).T)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return [out, *torch.autograd.grad((out * projection).sum(), [raw, *grams, *sq_norms])]


def many_rows_and_columns(n_cols: int = 37) -> tuple[Fragments, Fragments]:
    """20 rows (three of the backward's blocks of 8 rows) against 37 columns (three blocks of 16 lanes, the last
    one partial; 16 columns: one block, whose position-major scores the kernel reads in place), both with padded
    items."""
    rows = padded_fragments([9, 9, 4, 9, 7] * 4, seed=14)
    cols = padded_fragments([(3 + 5 * i) % 11 + 1 for i in range(n_cols)], seed=15)
    return rows, cols


def test_the_kernel_builds_on_this_machine() -> None:
    assert attention_kernel.load() is not None


@pytest.mark.parametrize("clipped", [True, False])
@pytest.mark.parametrize("context_lengths, query_lengths", [
    ([9, 9, 9], [3, 7, 5, 7]),  # blocks as context, captions of several lengths as queries
    ([4, 7, 2, 7], [9, 9, 9]),  # captions as context (padded context fragments), blocks as queries
    ([1, 5], [1, 6, 2])])       # one-fragment items on both sides
def test_kernel_equals_the_tensor_op_form(context_lengths, query_lengths, clipped: bool) -> None:
    context, query = padded_fragments(context_lengths, seed=1), padded_fragments(query_lengths, seed=2)
    fused = values_and_grads(_FusedL2Attention, context, query, clipped)
    plain = values_and_grads(_L2Attention, context, query, clipped)
    for name, a, b in zip(["value", "d raw", "d gram", "d query norms"], fused, plain):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clipped", [True, False])
@pytest.mark.parametrize("row_lengths, col_lengths", [([9, 9, 9], [3, 7, 5, 7]), ([4, 7, 2], [1, 6, 2, 6, 6])])
def test_both_directions_in_one_call_give_the_bits_of_two_calls(row_lengths, col_lengths, clipped, dtype) -> None:
    rows, cols = padded_fragments(row_lengths, seed=10), padded_fragments(col_lengths, seed=11)
    rows, cols = (Fragments(f.vectors.to(dtype), f.mask, f.gram.to(dtype), f.sq_norms.to(dtype)) for f in (rows, cols))
    paired, separate = kernel_both_ways(True, rows, cols, clipped), kernel_both_ways(False, rows, cols, clipped)
    names = ["value", "d raw", "d row gram", "d col gram", "d row norms", "d col norms"]
    for name, a, b in zip(names, paired, separate):
        assert a.dtype == dtype and torch.equal(a, b), name
    raw = _raw_scores(rows.vectors, cols.vectors)  # without a backward no tiles are kept, the values are the same
    out, *state = attention_kernel.load().paired_forward(raw, rows.gram, cols.gram, rows.sq_norms, cols.sq_norms,
                                                         rows.mask.to(dtype), cols.mask.to(dtype), clipped, 9.0, False)
    assert state[0].numel() == 0 and state[5].numel() == 0 and torch.equal(out, paired[0])


@pytest.mark.parametrize("n_cols", [37, 16])
@pytest.mark.parametrize("position_major", [False, True])
@pytest.mark.parametrize("clipped", [True, False])
def test_columns_in_several_lane_blocks_and_rows_in_several_blocks_equal_the_tensor_op_form(n_cols, position_major,
                                                                                          clipped) -> None:
    rows, cols = many_rows_and_columns(n_cols)
    fused, plain = kernel_both_ways(True, rows, cols, clipped, position_major), tensor_op_both_ways(rows, cols, clipped)
    for name, a, b in zip(["value", "d raw", "d row gram", "d col gram", "d row norms", "d col norms"], fused, plain):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() < 1e-12, name


@pytest.mark.parametrize("n_cols", [37, 16])
def test_both_layouts_of_the_raw_scores_give_the_same_bits(n_cols) -> None:
    rows, cols = many_rows_and_columns(n_cols)
    for a, b in zip(kernel_both_ways(True, rows, cols, True), kernel_both_ways(True, rows, cols, True, True)):
        assert torch.equal(a, b)


def test_float32_inputs_give_float32_results_close_to_float64() -> None:
    context, query = padded_fragments([9, 9], seed=3), padded_fragments([4, 8, 6], seed=4)
    as32 = Fragments(context.vectors.float(), context.mask, context.gram.float(), context.sq_norms.float())
    query32 = Fragments(query.vectors.float(), query.mask, query.gram.float(), query.sq_norms.float())
    single = values_and_grads(_FusedL2Attention, as32, query32, True)
    double = values_and_grads(_FusedL2Attention, context, query, True)
    for a, b in zip(single, double):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max().item() < 1e-5


def test_the_environment_turns_it_off(monkeypatch) -> None:
    monkeypatch.setenv("M2HSE_ATTENTION_KERNEL", "0")
    monkeypatch.setattr(attention_kernel, "_state", {})
    assert attention_kernel.load() is None
    raw = torch.zeros(2, 9, 3, 4)
    assert not model_local._fused_kernel_applies(raw, padded_fragments([4, 4, 4], seed=5))


def test_a_failed_build_falls_back_with_one_note(monkeypatch, capsys) -> None:
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Error building extension: g++ not found\n(more lines)")

    monkeypatch.setattr(attention_kernel, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert attention_kernel.load() is None
    assert attention_kernel.load() is None  # tried once per process
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "g++ not found" in lines[0] and "same formula" in lines[0]


def test_where_torch_serves_no_openmp_it_is_built_for_one_thread(monkeypatch) -> None:
    from torch.utils import cpp_extension
    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        if attention_kernel.THREADED in kwargs["extra_cflags"]:
            raise ImportError("m2hse_l2_attention.so: undefined symbol: GOMP_parallel")
        return "one-thread module"

    monkeypatch.setattr(attention_kernel, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", load)
    assert attention_kernel.load() == "one-thread module"
    assert [(c["name"].endswith("_one_thread"), attention_kernel.ONE_THREAD in c["extra_cflags"]) for c in calls] == [
        (False, False), (True, True)]


def test_without_a_backward_nothing_is_kept_and_values_agree() -> None:
    context, query = padded_fragments([9, 9, 9], seed=6), padded_fragments([5, 8, 3], seed=7)
    raw = _raw_scores(context.vectors, query.vectors)
    with_grad = values_and_grads(_FusedL2Attention, context, query, True)[0]
    out, w, gram_w, *_ = attention_kernel.load().forward(raw, context.gram, query.sq_norms, query.mask.double(),
                                                         context.mask.double(), True, 9.0, False)
    assert w.numel() == 0 and gram_w.numel() == 0  # no (nC, Lc, nQ, Lq) tiles written for evaluation
    assert (out - with_grad.detach()).abs().max().item() < 1e-12


def test_context_items_spread_over_threads_give_the_same_bits() -> None:
    context, query = padded_fragments([9] * 8, seed=8), padded_fragments([5, 8, 3, 7], seed=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(values_and_grads(_FusedL2Attention, context, query, True)
                           + kernel_both_ways(True, context, query, True)
                           + kernel_both_ways(True, *many_rows_and_columns(), True, position_major=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_paired_attention_runs_both_directions_in_the_paired_kernel(monkeypatch) -> None:
    calls = []
    apply = model_local._FusedPairedAttention.apply
    monkeypatch.setattr(model_local._FusedPairedAttention, "apply", lambda *args: calls.append(args) or apply(*args))
    blocks, words = padded_fragments([9, 9, 9], seed=12), padded_fragments([3, 7, 5, 7], seed=13)
    fused = model_local.paired_attention(blocks.vectors, torch.tensor([9, 9, 9]), words.vectors,
                                         torch.tensor([3, 7, 5, 7]))
    assert len(calls) == 1  # one group of four captions, one slice
    monkeypatch.setattr(model_local, "_kernel_serves", lambda device: False)
    plain = model_local.paired_attention(blocks.vectors, torch.tensor([9, 9, 9]), words.vectors,
                                         torch.tensor([3, 7, 5, 7]))
    assert len(calls) == 1 and (fused - plain).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_msb_loss_kernel_equals_its_tensor_ops(dtype) -> None:
    kernel = attention_kernel.load()
    g = torch.Generator().manual_seed(4)
    easy_sims, easy_labels, _ = skipped_anchor_batch()  # anchors skipped in both directions
    cases = [(torch.rand(3, 64, 64, generator=g, dtype=dtype) * 2 - 1, torch.randint(0, 30, (64,), generator=g)),
             (torch.rand(2, 2, 9, 9, generator=g, dtype=dtype), torch.randint(0, 3, (9,), generator=g)),
             (easy_sims.detach().to(dtype), easy_labels),
             (torch.rand(5, 5, generator=g, dtype=dtype), torch.zeros(5, dtype=torch.long))]  # no negatives
    with_nan = torch.rand(12, 12, generator=g, dtype=dtype) * 2 - 1
    with_nan[3, 7] = float("nan")  # skips anchors 3 and 7 with NaN gradients, so that the trainer stops
    cases.append((with_nan, torch.randint(0, 3, (12,), generator=g)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for sims, labels in cases:
        pos = relevance(labels, labels)
        for gammas in ((1.0, 0.5, 0.1), (2.0, 0.0, 0.3)):
            value, grad = kernel.msb_loss(sims, pos, *gammas, True)
            ref, ref_grad = loss._msb_terms(sims, pos, *gammas, True)
            assert value.shape == ref.shape == sims.shape[:-2] and grad.shape == sims.shape
            assert value.dtype == grad.dtype == dtype
            assert (value - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
            assert torch.equal(grad.isnan(), ref_grad.isnan())
            assert (grad - ref_grad).nan_to_num().abs().max() <= tol
            without, none = kernel.msb_loss(sims, pos, *gammas, False)
            assert none is None and torch.equal(without, value)
    assert (loss._msb_terms(*cases[0][:1], relevance(cases[0][1], cases[0][1]), 1.0, 0.5, 0.1, False)[0] > 0).all()
    assert loss._msb_terms(*cases[3][:1], relevance(cases[3][1], cases[3][1]), 1.0, 0.5, 0.1, False)[0] == 0
    nan_grad = loss._msb_terms(with_nan, relevance(cases[4][1], cases[4][1]), 1.0, 0.5, 0.1, True)[1].isnan()
    assert nan_grad.any() and not nan_grad.all()


def test_the_loss_kernel_serves_float32_and_float64_on_a_cpu() -> None:
    assert all(loss._cpu_kernel(torch.zeros(2, 2, dtype=dtype)) is not None for dtype in (torch.float32, torch.float64))
    assert loss._cpu_kernel(torch.zeros(2, 2, dtype=torch.bfloat16)) is None
