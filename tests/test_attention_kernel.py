"""The fused CPU attention kernel (csrc/l2_attention.cpp) against the tensor-op form it replaces."""
from __future__ import annotations

import pytest
import torch

import attention_kernel
import model_local
from model_local import Fragments, _FusedL2Attention, _L2Attention, _raw_scores
from tests.test_local_attention import unit_fragments


def padded_fragments(lengths: list[int], seed: int) -> Fragments:
    """Random unit fragments with these true lengths, prepared for attention."""
    return Fragments.of(unit_fragments(len(lengths), max(lengths), lengths, seed=seed), torch.tensor(lengths))


def values_and_grads(function, context: Fragments, query: Fragments, clipped: bool):
    raw = _raw_scores(context.vectors, query.vectors).requires_grad_()
    gram, sq_norms = context.gram.clone().requires_grad_(), query.sq_norms.clone().requires_grad_()
    out = function.apply(raw, gram, sq_norms, query.mask, context.mask, clipped, 9.0)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return [out, *torch.autograd.grad((out * projection).sum(), [raw, gram, sq_norms])]


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
            results.append(values_and_grads(_FusedL2Attention, context, query, True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
