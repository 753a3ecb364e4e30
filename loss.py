"""Multi-spring balance (MSB) loss, docs/METHOD.md section 5, vectorised over anchors."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

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
    """msb_loss, both anchor directions (rows, then columns: the transposed matrices) in one stack, and its gradient
    built in the forward pass from the softmax weights its log-sum-exps already give: a few tensor ops where
    autograd would record and replay several hundred."""

    @staticmethod
    def forward(ctx, sims, pos, gamma_1: float, gamma_2: float, delta: float):
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
        if ctx.needs_input_grad[0]:
            # d(term / gamma_1)/ds: the softmax weights of the kept negatives minus those of the kept positives
            grad = (neg_logits - neg_term[..., None]).exp_().sub_((pos_logits - pos_term[..., None]).exp_())
            grad = grad.mul_(valid[..., None]).div_(sims.size(-1))
            ctx.save_for_backward(grad[0] + grad[1].transpose(-1, -2))
        return (per_anchor[0].sum(-1) + per_anchor[1].sum(-1)) / sims.size(-1)

    @staticmethod
    @once_differentiable  # the saved gradient is a constant: no second derivative through it
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[..., None, None], None, None, None, None


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
