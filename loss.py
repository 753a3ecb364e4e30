"""Multi-spring balance (MSB) loss, docs/METHOD.md section 5, vectorised over anchors (compiled on a CPU)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

import attention_kernel
from metrics import relevance  # positives: the relevant pairs of the batch


def _mine(sims: torch.Tensor, pos: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positives and negatives of each row (masks), mined on the unmined sets."""
    with torch.no_grad():
        hardest_neg = sims.masked_fill(pos, float("-inf")).amax(dim=-1, keepdim=True)
        easiest_pos = sims.masked_fill(~pos, float("inf")).amin(dim=-1, keepdim=True)
    return pos & (sims < hardest_neg + delta), ~pos & (sims > easiest_pos - delta)


def msb_loss(sims: torch.Tensor, labels: torch.Tensor, gamma_1: float = 1.0, gamma_2: float = 0.5,
             delta: float = 0.1) -> torch.Tensor:
    """MSB loss of a square similarity matrix (rows: first modality) with item labels.

    sims may be a stack (..., B, B) of matrices of the same batch: one loss per matrix, in fewer tensor ops.
    """
    return _MSBLoss.apply(sims, relevance(labels, labels).to(sims.device), gamma_1, gamma_2, delta)


class _MSBLoss(torch.autograd.Function):
    """msb_loss, with its gradient built in the forward pass from the softmax weights its log-sum-exps already give
    (the backward is one multiply): on a CPU by the compiled kernel (csrc/msb_loss.cpp), elsewhere by _msb_terms."""

    @staticmethod
    def forward(ctx, sims, pos, gamma_1: float, gamma_2: float, delta: float):
        with_grad = ctx.needs_input_grad[0]
        kernel = _cpu_kernel(sims)
        if kernel is not None:
            loss, grad = kernel.msb_loss(sims, pos, gamma_1, gamma_2, delta, with_grad)
        else:
            loss, grad = _msb_terms(sims, pos, gamma_1, gamma_2, delta, with_grad)
        if with_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: no second derivative through it
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[..., None, None], None, None, None, None


def _cpu_kernel(sims: torch.Tensor):
    """The compiled kernels for float32 / float64 similarities on a CPU, or None (other devices and types, no compiler,
    M2HSE_ATTENTION_KERNEL=0)."""
    serves = sims.device.type == "cpu" and sims.dtype in (torch.float32, torch.float64)
    return attention_kernel.load() if serves else None


def _msb_terms(sims: torch.Tensor, pos: torch.Tensor, gamma_1: float, gamma_2: float, delta: float,
               with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss of each matrix of sims (..., B, B) and, with_grad, its gradient, as tensor ops: both anchor
    directions (rows, then columns: the transposed matrices) in one stack."""
    both = torch.stack((sims, sims.transpose(-1, -2)))  # (2, ..., B, B): rows as anchors, then columns
    pos = torch.stack((pos, pos.T)).view((2,) + (1,) * (sims.dim() - 2) + pos.shape)
    keep_pos, keep_neg = _mine(both, pos, delta)
    valid = (keep_pos.any(-1) & keep_neg.any(-1)).all(0)  # an anchor needs both of its kept sets, both ways
    # Skipped anchors get a full mask so their (unused) log-sum-exp stays finite.
    full = ~valid[..., None]
    pos_logits = (gamma_2 - gamma_1 * both).masked_fill_(~(keep_pos | full), float("-inf"))
    neg_logits = (gamma_1 * both - gamma_2).masked_fill_(~(keep_neg | full), float("-inf"))
    pos_term, neg_term = pos_logits.logsumexp(-1), neg_logits.logsumexp(-1)
    per_anchor = torch.where(valid, (pos_term + neg_term) / gamma_1, 0.0)
    loss = (per_anchor[0].sum(-1) + per_anchor[1].sum(-1)) / sims.size(-1)
    if not with_grad:
        return loss, None
    # d(term / gamma_1)/ds: the softmax weights of the kept negatives minus those of the kept positives
    grad = (neg_logits - neg_term[..., None]).exp_().sub_((pos_logits - pos_term[..., None]).exp_())
    grad = grad.mul_(valid[..., None]).div_(sims.size(-1))
    return loss, grad[0] + grad[1].transpose(-1, -2)


def triplet_loss(sims: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """VSE++ loss (max violation) of a square similarity matrix, positives = relevant pairs.

    Every positive pair (i, j) pays [margin - s_ij + hardest negative of row i]_+ and
    [margin - s_ij + hardest negative of column j]_+; each row and each column averages its positive pairs
    (one positive: the VSE++ term itself), and the rows and columns are summed, as in VSE++. A row or
    column without a negative adds nothing. With one positive per row (the diagonal) this is VSE++ exactly.
    sims may be a stack (..., B, B), as for msb_loss.
    """
    pos = relevance(labels, labels).to(sims.device)
    total = sims.new_zeros(sims.shape[:-2])
    for s, p in ((sims, pos), (sims.transpose(-1, -2), pos.T)):
        hardest_neg = s.masked_fill(p, float("-inf")).max(dim=-1, keepdim=True).values  # its gradient: one entry
        hinge = (margin - s + hardest_neg).clamp_min(0).masked_fill(~p, 0.0)
        total = total + (hinge.sum(dim=-1) / p.sum(dim=-1).clamp_min(1)).sum(-1)  # an unlabelled item: none
    return total


def pair_loss(sims: torch.Tensor, labels: torch.Tensor, opt: dict) -> torch.Tensor:
    """The loss chosen by --loss, MSB (docs/METHOD.md section 5) or the VSE++ triplet baseline, of a similarity
    matrix or of each of a stack (..., B, B)."""
    if opt["loss"] == "triplet":
        return triplet_loss(sims, labels, opt["margin"])
    return msb_loss(sims, labels, opt["gamma_1"], opt["gamma_2"], opt["Delta"])
