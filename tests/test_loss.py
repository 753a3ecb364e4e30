"""MSB loss (loss.msb_loss) against the looped reference of docs/METHOD.md section 5 (tests/references): every test
runs on both implementations, the compiled CPU kernel (csrc/msb_loss.cpp) and the tensor ops (other devices)."""
from __future__ import annotations

import pytest
import torch

import loss as loss_module
from loss import msb_loss
from tests.references import msb_anchor_terms, msb_loss_reference

TOL = 1e-6


@pytest.fixture(params=["kernel", "tensor ops"], autouse=True)
def implementation(request, monkeypatch) -> str:
    """Each test once with the compiled kernel and once with the tensor ops."""
    if request.param == "kernel":
        assert loss_module._cpu_kernel(torch.zeros(2, 2)) is not None, "the compiled kernel does not build here"
    else:
        monkeypatch.setattr(loss_module, "_cpu_kernel", lambda sims: None)
    return request.param


def random_batch(batch: int, n_labels: int, seed: int, separation: float = 0.0):
    """Square float64 sims in roughly [-1, 1] (positives shifted up by `separation`) and labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_labels, (batch,), generator=g)
    sims = torch.rand(batch, batch, generator=g, dtype=torch.float64) * 2 - 1
    sims = sims + separation * (labels[:, None] == labels[None, :]).double()
    return sims.requires_grad_(True), labels


def loss_and_grad(fn, sims, labels, **kw):
    loss = fn(sims, labels, **kw)
    (grad,) = torch.autograd.grad(loss, sims)
    return loss.detach(), grad


CASES = [  # batch, labels, gamma_1, gamma_2, delta, separation, seed
    (8, 2, 1.0, 0.5, 0.1, 0.0, 0),
    (12, 3, 1.0, 0.5, 0.1, 0.3, 1),
    (17, 4, 2.0, 0.5, 0.2, 0.0, 2),
    (24, 5, 0.5, 1.0, 0.05, 0.5, 3),
    (33, 8, 1.0, 0.0, 0.3, 0.2, 4),
    (40, 3, 3.0, 0.7, 0.1, 0.4, 5),
    (40, 20, 1.0, 0.5, 0.1, 0.0, 6),
]


@pytest.mark.parametrize("batch,n_labels,g1,g2,delta,sep,seed", CASES)
def test_msb_loss_matches_reference_values_and_gradients(batch, n_labels, g1, g2, delta, sep, seed):
    sims, labels = random_batch(batch, n_labels, seed, sep)
    kw = dict(gamma_1=g1, gamma_2=g2, delta=delta)
    loss, grad = loss_and_grad(msb_loss, sims, labels, **kw)
    ref, ref_grad = loss_and_grad(lambda s, y, **k: msb_loss_reference(s, y, g1, g2, delta), sims, labels)
    assert loss.dtype == torch.float64
    assert torch.isfinite(loss) and ref != 0
    assert abs(loss.item() - ref.item()) < TOL
    assert torch.allclose(grad, ref_grad, atol=TOL, rtol=0)


def test_defaults_are_spec_values():
    sims, labels = random_batch(16, 3, 7, 0.2)
    ref = msb_loss_reference(sims, labels, 1.0, 0.5, 0.1)
    assert abs(msb_loss(sims, labels).item() - ref.item()) < TOL
    # and a different delta gives a different value, so the check above can fail
    assert abs(msb_loss_reference(sims, labels, 1.0, 0.5, 0.3).item() - ref.item()) > 1e-4


def test_reference_on_hand_computed_case():
    # Two anchors, single-element kept sets: each term is (n - p) with gamma_1 = 1 (the g2 cancel).
    sims = torch.tensor([[0.50, 0.45], [0.42, 0.48]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1])
    expected = ((0.45 - 0.50) + (0.42 - 0.48) + (0.42 - 0.50) + (0.45 - 0.48)) / 2
    assert abs(msb_loss_reference(sims, labels).item() - expected) < 1e-12
    assert abs(msb_loss(sims, labels).item() - expected) < 1e-12
    (grad,) = torch.autograd.grad(msb_loss(sims, labels), sims)
    # d/d(diag) = -2/2, d/d(off-diag) = +2/2 (each entry is in one row and one column term)
    assert torch.allclose(grad, torch.tensor([[-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), atol=1e-12)


def test_mining_excludes_easy_pairs():
    # Anchor 0's positive 0.9 is far above every negative: not kept, so anchor 0 is skipped.
    sims = torch.tensor([[0.90, 0.90, 0.10],
                         [0.88, 0.30, 0.35],
                         [0.10, 0.32, 0.40]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    assert [t is None for t in msb_anchor_terms(sims, labels)] == [True, False, False]
    ref = msb_loss_reference(sims, labels)
    assert abs(msb_loss(sims, labels).item() - ref.item()) < TOL


def test_single_label_batch_is_zero_with_zero_gradient():
    sims = torch.rand(10, 10, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(10, dtype=torch.long)
    loss = msb_loss(sims, labels)
    assert loss.requires_grad
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, sims)
    assert torch.equal(grad, torch.zeros_like(sims))
    assert msb_loss_reference(sims, labels).item() == 0.0


def skipped_anchor_batch():
    """Batch where class 0 (items 0-2) is perfectly separated: all its anchors have no kept positive."""
    g = torch.Generator().manual_seed(11)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 1, 2])
    n = len(labels)
    sims = torch.rand(n, n, generator=g, dtype=torch.float64) * 0.6 - 0.2   # in [-0.2, 0.4]
    block = labels == 0
    sims[block[:, None] & block[None, :]] = 0.95                    # class-0 positives, very easy
    sims[block[:, None] & ~block[None, :]] = -0.9                  # class-0 rows against others
    sims[~block[:, None] & block[None, :]] = -0.9                  # others' rows against class 0
    return sims.requires_grad_(True), labels, block


def test_skipped_anchors_contribute_nothing():
    sims, labels, block = skipped_anchor_batch()
    terms = msb_anchor_terms(sims, labels)
    skipped = [i for i, t in enumerate(terms) if t is None]
    assert skipped == [0, 1, 2]  # the construction does what it claims
    loss = msb_loss(sims, labels)
    ref = msb_loss_reference(sims, labels)
    assert abs(loss.item() - ref.item()) < TOL
    # equals the surviving anchors' terms over the FULL batch size
    survivors = sum(t[0] + t[1] for t in terms if t is not None) / len(labels)
    assert abs(loss.item() - survivors.item()) < TOL
    (grad,) = torch.autograd.grad(loss, sims)
    (ref_grad,) = torch.autograd.grad(msb_loss_reference(sims, labels), sims)
    assert torch.allclose(grad, ref_grad, atol=TOL, rtol=0)
    # class-0 x class-0 entries only feed the skipped anchors' terms
    assert torch.equal(grad[block][:, block], torch.zeros(3, 3, dtype=torch.float64))
    assert grad.abs().sum() > 0
    # changing that block (keeping it easy) leaves the loss unchanged
    moved = sims.detach().clone()
    moved[block[:, None] & block[None, :]] = 0.8
    assert abs(msb_loss(moved, labels).item() - loss.item()) < 1e-12


def multi_hot(batch: int, n_classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(batch, n_classes, generator=g) < 0.3).long()
    y[torch.arange(batch), torch.randint(0, n_classes, (batch,), generator=g)] = 1  # at least one label
    return y


@pytest.mark.parametrize("batch,n_classes,seed", [(10, 4, 0), (25, 6, 1)])
def test_multi_hot_labels_share_at_least_one(batch, n_classes, seed):
    sims, _ = random_batch(batch, 2, seed)
    labels = multi_hot(batch, n_classes, seed)
    # the label sets must overlap without being equal somewhere, or this is not a multi-label test
    shares = (labels @ labels.T) > 0
    equal = (labels[:, None, :] == labels[None, :, :]).all(-1)
    assert (shares & ~equal).any()
    loss, grad = loss_and_grad(msb_loss, sims, labels)
    ref, ref_grad = loss_and_grad(msb_loss_reference, sims, labels)
    assert abs(loss.item() - ref.item()) < TOL
    assert torch.allclose(grad, ref_grad, atol=TOL, rtol=0)


def test_one_hot_multi_label_equals_single_label():
    sims, labels = random_batch(14, 4, 3, 0.2)
    one_hot = torch.nn.functional.one_hot(labels, 4)
    assert abs(msb_loss(sims, one_hot).item() - msb_loss(sims, labels).item()) < 1e-12


def test_column_labels_equal_flat_labels():
    sims, labels = random_batch(15, 3, 9, 0.1)
    flat = msb_loss(sims, labels)
    column = msb_loss(sims, labels[:, None])
    assert abs(flat.item() - column.item()) < 1e-12
    (g_flat,) = torch.autograd.grad(flat, sims)
    (g_col,) = torch.autograd.grad(column, sims)
    assert torch.equal(g_flat, g_col)


def test_float32_finite_and_differentiable():
    sims64, labels = random_batch(20, 4, 12, 0.2)
    sims32 = sims64.detach().float().requires_grad_(True)
    loss = msb_loss(sims32, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert sims32.grad is not None and torch.isfinite(sims32.grad).all() and sims32.grad.abs().sum() > 0
    assert abs(loss.item() - msb_loss_reference(sims64, labels).item()) < 1e-4


@pytest.mark.parametrize("name", ["msb", "triplet"])
def test_a_stack_of_matrices_gives_each_matrix_its_own_loss(name: str) -> None:
    from loss import pair_loss
    opt = {"loss": name, "gamma_1": 1.0, "gamma_2": 0.5, "Delta": 0.1, "margin": 0.2}
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(0, 4, (12,), generator=g)
    stack = (torch.rand(3, 12, 12, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    weights = torch.tensor([1.0, 0.4, 0.7], dtype=torch.float64)
    stacked = pair_loss(stack, labels, opt)
    (stacked_grad,) = torch.autograd.grad((weights * stacked).sum(), stack)
    assert stacked.shape == (3,)
    for i in range(3):
        one, one_grad = loss_and_grad(lambda s, l: weights[i] * pair_loss(s, l, opt),
                                      stack[i].detach().requires_grad_(), labels)
        assert abs(weights[i] * stacked[i].item() - one.item()) < 1e-12 and one.item() != 0
        assert (stacked_grad[i] - one_grad).abs().max().item() < 1e-12

