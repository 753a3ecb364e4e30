"""Multi-spring balance (MSB) loss, docs/METHOD.md section 5, vectorised over anchors."""
from __future__ import annotations

import torch

from metrics import relevance  # positives: the relevant pairs of the batch


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp over the masked entries; rows with no entry give -inf."""
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=-1)


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
    pos = relevance(labels, labels).to(sims.device)
    sims_t = sims.transpose(-1, -2)
    keep_pos_r, keep_neg_r = _mine(sims, pos, delta)
    keep_pos_c, keep_neg_c = _mine(sims_t, pos.T, delta)
    valid = keep_pos_r.any(-1) & keep_neg_r.any(-1) & keep_pos_c.any(-1) & keep_neg_c.any(-1)
    # Skipped anchors get a full mask so their (unused) log-sum-exp stays finite and grads stay 0.
    full = ~valid[..., None]
    total = 0
    for s, keep_pos, keep_neg in ((sims, keep_pos_r, keep_neg_r), (sims_t, keep_pos_c, keep_neg_c)):
        pos_term = _masked_logsumexp(gamma_2 - gamma_1 * s, keep_pos | full)
        neg_term = _masked_logsumexp(gamma_1 * s - gamma_2, keep_neg | full)
        total = total + torch.where(valid, (pos_term + neg_term) / gamma_1, 0.0).sum(-1)
    return total / sims.size(-1)


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
