"""Local (fine-grained) subnetwork: cross-attention similarities of blocks and words (docs/METHOD.md
sections 3-4).

All pairs of a batch are scored at once, with no loop over items. Raw fragment scores live in a
context-major layout (n_context, L_context, n_query, L_query), so the norm over the query index is a
reduction over the last, contiguous axis and the Gram products are one bmm batched over context
items. The attended vectors v_l are never built: <Q_l, v_l> = sum_k w_kl a_kl and
|v_l|^2 = w_l^T G w_l with G = C C^T (docs/METHOD.md section 4). Large galleries are processed in
slices of context items (SLICE_ELEMENTS) so that the intermediates stay small. On a CPU the L2 score
norms run in a fused C++ kernel (csrc/l2_attention.cpp) over tiles of one row item against 16 columns, the
columns along the vector lanes: _FusedPairedAttention scores both directions of paired_attention from the same
tiles, all caption groups of a call in one autograd Function whose loop over groups and slices runs in C++
(csrc/paired_groups.cpp), its columns packed position-major so that the raw-score matmul gives the kernel that
layout; _FusedL2Attention one direction (cross_attention); _L2Attention is the same computation as tensor ops,
used on other devices and without a compiler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attention_kernel
from encoders import L2_EPS
from subnetwork import TwoBranchModel

ATTENTION_NORMS = ("clipped_l2norm", "l2norm", "softmax", "no_norm")
L2_NORMS = ("clipped_l2norm", "l2norm")
COSINE_EPS = 1e-8
LEAKY_SLOPE = 0.1
# Elements of one (slice, Lc, nQ, Lq) score tensor: large enough for efficient matmuls, small
# enough to stay in cache and to reuse freed memory instead of page-faulting fresh memory.
SLICE_ELEMENTS = 1 << 20
# Columns (captions) scored together in paired_attention, in length order: few enough that a group's
# longest caption is close to its others, enough for efficient matmuls.
COLUMN_GROUP = 16


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean (n, max_len), True at the first lengths[i] positions of row i."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def gram_matrices(vectors: torch.Tensor) -> torch.Tensor:
    """Gram matrices X X^T (n, L, L) of fragment sets (n, L, d)."""
    return torch.bmm(vectors, vectors.transpose(1, 2))


def trimmed(fragments: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded fragments (n, L, d) trimmed to the longest true length with the padding zeroed, and their mask."""
    lengths = lengths.to(fragments.device)
    shortest, longest = (int(value) for value in torch.aminmax(lengths))
    mask = length_mask(lengths, longest)
    if shortest == fragments.size(1):  # nothing to trim or zero (image blocks)
        return fragments, mask
    return fragments[:, :longest] * mask[..., None].to(fragments.dtype), mask


@dataclass
class Fragments:
    """Padded fragment sets (n, L, d) with what attention needs of them as query or as context."""

    vectors: torch.Tensor  # trimmed to the longest true length, padding zeroed
    mask: torch.Tensor  # (n, L) True at true positions
    gram: torch.Tensor  # (n, L, L) context Gram matrices C C^T
    sq_norms: torch.Tensor  # (n, L) |Q_l|^2

    @classmethod
    def of(cls, fragments: torch.Tensor, lengths: torch.Tensor) -> Fragments:
        """Trim to the longest true length and zero the padding, so padding scores exactly 0."""
        vectors, mask = trimmed(fragments, lengths)
        return cls(vectors, mask, gram_matrices(vectors), vectors.pow(2).sum(-1))

    def select(self, items: torch.Tensor) -> Fragments:
        """What attention reads of some items (masks, Gram, norms); their vectors are not copied."""
        return Fragments(self.vectors[:0], self.mask.index_select(0, items), self.gram.index_select(0, items),
                         self.sq_norms.index_select(0, items))

    def __getitem__(self, items: slice) -> Fragments:
        return Fragments(self.vectors[items], self.mask[items], self.gram[items], self.sq_norms[items])

    def __len__(self) -> int:
        return self.vectors.size(0)


def _slice_items(context_len: int, query_positions: int) -> int:
    """Context items a slice, so that a slice's (slice, Lc, nQ, Lq) intermediates stay cache-sized."""
    return max(1, SLICE_ELEMENTS // (context_len * query_positions))


def _context_slices(context_mask: torch.Tensor, query_mask: torch.Tensor) -> list[slice]:
    """Slices of the context items so that their (slice, Lc, nQ, Lq) intermediates stay cache-sized."""
    step = _slice_items(context_mask.size(1), query_mask.numel())
    return [slice(first, first + step) for first in range(0, context_mask.size(0), step)]


def _raw_scores(context: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """a[b, k, a, l] = <context[b, k], query[a, l]>, shape (nC, Lc, nQ, Lq), from one matmul."""
    n_ctx, ctx_len, dim = context.shape
    n_query, query_len, _ = query.shape
    flat = context.reshape(-1, dim) @ query.reshape(-1, dim).T
    return flat.view(n_ctx, ctx_len, n_query, query_len)


def _attention_logits(raw: torch.Tensor, query_mask: torch.Tensor, context_mask: torch.Tensor,
                      norm: str, lambda_softmax: float) -> torch.Tensor:
    """lambda * (docs/METHOD.md section 4, step 2, of raw over the true query positions l), -inf at padded
    context k."""
    context_bias = torch.zeros(context_mask.shape, dtype=raw.dtype, device=raw.device)
    context_bias = context_bias.masked_fill(~context_mask, float("-inf"))[:, :, None, None]
    if norm == "no_norm":
        return torch.add(context_bias, raw, alpha=lambda_softmax)
    if norm == "softmax":
        normed = raw.masked_fill(~query_mask, float("-inf")).softmax(dim=-1)
        return torch.add(context_bias, normed, alpha=lambda_softmax)
    if norm not in ("clipped_l2norm", "l2norm"):
        raise ValueError(f"unknown raw_feature_norm {norm!r}: use one of {ATTENTION_NORMS}")
    scores = F.leaky_relu(raw, LEAKY_SLOPE) if norm == "clipped_l2norm" else raw
    # Released-code L2, x / sqrt(sum((x + eps)^2)) over the true l: padded scores are exactly 0 and
    # get no eps, so they add nothing to the norm.
    shifted = scores + L2_EPS * query_mask.to(scores.dtype)
    l2_norms = torch.linalg.vector_norm(shifted, dim=-1, keepdim=True)
    return torch.addcmul(context_bias, scores, lambda_softmax / l2_norms)


def _attend(raw: torch.Tensor, context: Fragments, query: Fragments, norm: str,
            lambda_softmax: float) -> torch.Tensor:
    """att(Q = query[a], C = context[b]) for all pairs, as (nC, nQ); raw from _raw_scores.

    For aligned pairs (_attend_aligned) raw is (P, Lc, 1, Lq) and the query's mask and squared norms
    are (P, 1, 1, Lq), so every reduction below keeps the 4-d layout until the end.
    """
    if norm in L2_NORMS:
        attention = _FusedL2Attention if _fused_kernel_applies(raw, query) else _L2Attention
        return attention.apply(raw, context.gram, query.sq_norms, query.mask, context.mask,
                               norm == "clipped_l2norm", lambda_softmax)
    return attend_autograd(raw, context, query, norm, lambda_softmax)


def attend_autograd(raw: torch.Tensor, context: Fragments, query: Fragments, norm: str,
                    lambda_softmax: float) -> torch.Tensor:
    """_attend for every norm, written as tensor ops for autograd (the L2 norms' plain form)."""
    logits = _attention_logits(raw, query.mask, context.mask, norm, lambda_softmax)
    weights = logits.softmax(dim=1)  # over the context fragments k
    query_dot_attended = (weights * raw).sum(dim=1, keepdim=True)  # (nC, 1, nQ, Lq)
    n_ctx, ctx_len, _, _ = weights.shape
    gram_weights = torch.bmm(context.gram, weights.reshape(n_ctx, ctx_len, -1)).view_as(weights)
    attended_sq_norm = (weights * gram_weights).sum(dim=1, keepdim=True)
    return _mean_cosine(query_dot_attended, attended_sq_norm, query.sq_norms, query.mask)[0]


def _mean_cosine(query_dot_attended: torch.Tensor, attended_sq_norm: torch.Tensor, query_sq_norms: torch.Tensor,
                 query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the true l of cos(Q_l, v_l), as (nC, nQ), and the clamped |Q_l||v_l| (nC, 1, nQ, Lq)."""
    # max(|Q||v|, eps) written as sqrt(max(|Q|^2 |v|^2, eps^2)): no sqrt of a bare |v|^2.
    norm_product = (query_sq_norms * attended_sq_norm).clamp_min(COSINE_EPS ** 2).sqrt()
    cosines = query_dot_attended / norm_product * query_mask.to(norm_product.dtype)
    return (cosines.sum(dim=-1) / query_mask.sum(dim=-1).to(norm_product.dtype)).squeeze(1), norm_product


class _L2Attention(torch.autograd.Function):
    """_attend for the L2 score norms, with a hand-written backward (docs/METHOD.md section 4).

    Same formula as the autograd path, fewer passes over the (nC, Lc, nQ, Lq) tensors: the logits
    lambda * h_kl / |h_k + eps| lie in [-lambda, lambda], so the softmax needs no max shift; the
    softmax backward's sum_k w_kl dw_kl is rebuilt from the small per-l sums already at hand; and only
    raw, the weights and G w are kept for the backward.
    """

    @staticmethod
    def forward(ctx, raw, gram, query_sq_norms, query_mask, context_mask, clipped: bool, lambda_softmax: float):
        query_weight = query_mask.to(raw.dtype)
        scores = F.leaky_relu(raw, LEAKY_SLOPE) if clipped else raw
        # Released-code L2 over the true l: padded scores are exactly 0 and get no eps.
        spare = scores + L2_EPS * query_weight
        scale = lambda_softmax / torch.linalg.vector_norm(spare, dim=-1, keepdim=True)
        weights = (scores.mul_(scale) if clipped else raw * scale).exp_()  # backward recomputes scores
        if not bool(context_mask.all()):
            weights.mul_(context_mask.to(raw.dtype)[:, :, None, None])
        weights.div_(weights.sum(dim=1, keepdim=True))  # softmax over the context fragments k
        n_ctx, ctx_len = weights.shape[:2]
        gram_weights = torch.bmm(gram, weights.view(n_ctx, ctx_len, -1)).view_as(weights)
        query_dot_attended = torch.mul(weights, raw, out=spare).sum(dim=1, keepdim=True)
        backward_needs = any(ctx.needs_input_grad)  # gram_weights is kept for the backward
        products = torch.mul(weights, gram_weights, out=spare) if backward_needs else gram_weights.mul_(weights)
        attended_sq_norm = products.sum(dim=1, keepdim=True)
        out, norm_product = _mean_cosine(query_dot_attended, attended_sq_norm, query_sq_norms, query_mask)
        ctx.save_for_backward(raw, gram_weights, weights, scale, query_sq_norms, query_weight,
                              query_dot_attended, attended_sq_norm, norm_product)
        ctx.clipped, ctx.lambda_softmax = clipped, lambda_softmax
        return out

    @staticmethod
    def backward(ctx, grad_out):
        raw, gram_weights, weights, scale, sq_norms, query_weight, dot, att_sq, norm_product = ctx.saved_tensors
        # cos_l = dot_l / sqrt(max(|Q_l|^2 att_sq_l, eps^2)), averaged over the true l.
        grad_cos = grad_out[:, None, :, None] * query_weight / query_weight.sum(dim=-1, keepdim=True)
        grad_dot = grad_cos / norm_product
        inside = (sq_norms * att_sq > COSINE_EPS ** 2).to(raw.dtype)
        grad_product_sq = -grad_cos * dot / norm_product.pow(3) / 2 * inside  # d / d(|Q|^2 |v|^2)
        grad_sq_norms = (grad_product_sq * att_sq).sum_to_size(sq_norms.shape)
        grad_att_sq = grad_product_sq * sq_norms
        # dL/dw_kl = grad_dot_l raw_kl + 2 grad_att_sq_l (G w)_kl; its w-weighted sum over k is built from
        # dot_l and att_sq_l, so the softmax backward needs no extra reduction over k.
        weighted_sum = grad_dot * dot + 2 * grad_att_sq * att_sq
        n_ctx, ctx_len = weights.shape[:2]
        flat = weights.view(n_ctx, ctx_len, -1)
        grad_gram = torch.bmm(flat * grad_att_sq.reshape(n_ctx, 1, -1), flat.transpose(1, 2))
        # gram_weights is not needed again: the logits' gradient is built in its buffer.
        grad_logits = gram_weights.mul_(2 * grad_att_sq).addcmul_(raw, grad_dot).sub_(weighted_sum).mul_(weights)
        # logits_kl = lambda h_kl / n_k with n_k = |h_k + eps m|: back through the norm over l.
        scores = F.leaky_relu(raw, LEAKY_SLOPE) if ctx.clipped else raw
        spare = grad_logits * scores
        along_norm = spare.sum(dim=-1, keepdim=True).mul_(scale.pow(2) / ctx.lambda_softmax ** 2)
        shifted = torch.add(scores, L2_EPS * query_weight, out=scores if ctx.clipped else spare)
        grad_scores = grad_logits.sub_(shifted.mul_(along_norm)).mul_(scale)
        if ctx.clipped:
            grad_scores = torch.ops.aten.leaky_relu_backward.grad_input(grad_scores, raw, LEAKY_SLOPE, False,
                                                                        grad_input=spare)
        grad_raw = grad_scores.addcmul_(weights, grad_dot)  # raw also enters dot_l directly
        return grad_raw, grad_gram, grad_sq_norms, None, None, None, None


def _kernel_serves(device: torch.device) -> bool:
    """Whether the fused CPU kernel computes the L2-norm attention of tensors on this device."""
    return device.type == "cpu" and attention_kernel.load() is not None


def _fused_kernel_applies(raw: torch.Tensor, query: Fragments) -> bool:
    """The fused kernel takes CPU tensors in the all-pairs layout (not the aligned pairs of shortlists)."""
    return query.sq_norms.dim() == 2 and _kernel_serves(raw.device)


class _FusedL2Attention(torch.autograd.Function):
    """_L2Attention computed by the fused CPU kernel (csrc/l2_attention.cpp): same formula, same saved steps."""

    @staticmethod
    def forward(ctx, raw, gram, query_sq_norms, query_mask, context_mask, clipped: bool, lambda_softmax: float):
        raw, query_sq_norms = raw.contiguous(), query_sq_norms.contiguous()
        query_weight, context_weight = query_mask.to(raw.dtype), context_mask.to(raw.dtype)
        backward_needs = any(ctx.needs_input_grad)
        out, *saved = attention_kernel.load().forward(raw, gram.contiguous(), query_sq_norms, query_weight,
                                                      context_weight, clipped, lambda_softmax, backward_needs)
        if backward_needs:
            ctx.save_for_backward(raw, query_sq_norms, query_weight, *saved)
        ctx.clipped, ctx.lambda_softmax = clipped, lambda_softmax
        return out

    @staticmethod
    def backward(ctx, grad_out):
        raw, query_sq_norms, query_weight, *saved = ctx.saved_tensors
        grad_raw, grad_gram, grad_sq_norms = attention_kernel.load().backward(
            grad_out, raw, query_sq_norms, query_weight, *saved, ctx.clipped, ctx.lambda_softmax)
        return grad_raw, grad_gram, grad_sq_norms, None, None, None, None


@dataclass
class ColumnGroups:
    """Columns (captions) of similar length scored together, each group trimmed to its longest member.

    Training batches come longest first (data.collate), so their groups are contiguous slices; other orders
    (evaluation) are grouped shortest first through a stable argsort (grouping them longest first changed the
    last bit of some scores, which broke exact ties between duplicate captions, tests/test_captions_per_image.py).
    """

    order: torch.Tensor | None  # the columns in group order; None when they already come in it
    bounds: list[tuple[int, int, int]]  # (first, end, length) of each group, positions in group order

    @classmethod
    def of(cls, lengths: torch.Tensor) -> ColumnGroups:
        """Groups of COLUMN_GROUP columns, or one group when all lengths are equal."""
        values = lengths.tolist()
        if all(value == values[0] for value in values):
            return cls(None, [(0, len(values), values[0])])
        order = None
        if any(later > earlier for earlier, later in zip(values, values[1:])):
            order = torch.argsort(lengths, stable=True)
            values = [values[i] for i in order.tolist()]
        bounds = [(first, min(first + COLUMN_GROUP, len(values))) for first in range(0, len(values), COLUMN_GROUP)]
        return cls(order, [(first, end, max(values[first:end])) for first, end in bounds])

    def members(self) -> list[slice | torch.Tensor]:
        """The columns of each group: slices of the batch, or their indices in length order."""
        return [slice(first, end) if self.order is None else self.order[first:end] for first, end, _ in self.bounds]

    def restore(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores (n, columns) in group order back in the columns' own order."""
        return scores if self.order is None else scores.index_select(1, torch.argsort(self.order))

    def kernel_bounds(self, row_len: int) -> list[int]:
        """(first, end, length, rows a slice) of each group against rows of row_len fragments, flattened, as the
        kernel takes them."""
        return [value for first, end, length in self.bounds
                for value in (first, end, length, _slice_items(row_len, (end - first) * length))]


class _FusedPairedAttention(torch.autograd.Function):
    """paired_attention with an L2 score norm on a CPU: att(Q = col, C = row) + att(Q = row, C = col) of all
    (row, col) pairs, the same formula as _paired_fragments, in two calls of the fused kernel
    (csrc/paired_groups.cpp): one for the forward of all caption groups and slices of rows (_slice_items), one for its
    backward.

    Each group's columns are packed position-major (trimmed, padding zeroed), so that its raw-score matmul gives the
    kernel its scores with the columns along the vector lanes; the Gram matrices, squared norms and all their
    gradients are computed around the kernel calls, the rows' once for all groups. The loop over groups runs in C++:
    as Python it cost more in interpreter and dispatch time than in arithmetic (docs/SPEED.md).
    """

    @staticmethod
    def forward(ctx, rows, cols, row_mask, col_lengths, groups: ColumnGroups, clipped: bool, lambda_softmax: float):
        backward_needs = any(ctx.needs_input_grad)
        ctx.args = (groups.order, groups.kernel_bounds(rows.size(1)), clipped, lambda_softmax)  # backward's too
        out, *saved = attention_kernel.load().grouped_forward(rows, cols, row_mask, col_lengths, *ctx.args,
                                                              backward_needs)
        if backward_needs:
            ctx.save_for_backward(rows, *saved)
            ctx.col_shape = list(cols.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, *saved = ctx.saved_tensors
        grad_rows, grad_cols = attention_kernel.load().grouped_backward(grad_out.contiguous(), rows, saved,
                                                                        ctx.col_shape, *ctx.args)
        return grad_rows, grad_cols, None, None, None, None, None


def cross_attention(query: torch.Tensor, query_lengths: torch.Tensor, context: torch.Tensor,
                    context_lengths: torch.Tensor, raw_feature_norm: str = "clipped_l2norm",
                    lambda_softmax: float = 9.0) -> torch.Tensor:
    """(nQ, nC) matrix of att(Q = query[a][:len], C = context[b][:len]), docs/METHOD.md section 4.

    query (nQ, Lq, d) and context (nC, Lc, d) are padded; lengths are (n,) integer tensors.
    """
    query, context = Fragments.of(query, query_lengths), Fragments.of(context, context_lengths)
    per_context = [_attend(_raw_scores(context.vectors[b], query.vectors), context[b], query, raw_feature_norm,
                           lambda_softmax) for b in _context_slices(context.mask, query.mask)]
    return torch.cat(per_context).T


def paired_attention(rows: torch.Tensor, row_lengths: torch.Tensor, cols: torch.Tensor,
                     col_lengths: torch.Tensor, raw_feature_norm: str = "clipped_l2norm",
                     lambda_softmax: float = 9.0) -> torch.Tensor:
    """(nR, nC) matrix of att(Q = cols[c], C = rows[r]) + att(Q = rows[r], C = cols[c]).

    With rows = image blocks and cols = words this is t2i + i2t; with rows = CNN blocks and
    cols = BoVW blocks it is S_A2. Both directions share the raw scores of each slice of rows.
    """
    col_lengths = col_lengths.to(cols.device)
    groups = ColumnGroups.of(col_lengths)
    if raw_feature_norm in L2_NORMS and _kernel_serves(rows.device):
        row_vectors, row_mask = trimmed(rows, row_lengths)
        return _FusedPairedAttention.apply(row_vectors, cols, row_mask, col_lengths, groups,
                                           raw_feature_norm == "clipped_l2norm", lambda_softmax)
    row_fragments = Fragments.of(rows, row_lengths)
    return groups.restore(torch.cat([
        _paired_fragments(row_fragments, Fragments.of(cols[members], col_lengths[members]), raw_feature_norm,
                          lambda_softmax) for members in groups.members()], dim=1))


def _paired_fragments(rows: Fragments, cols: Fragments, raw_feature_norm: str, lambda_softmax: float) -> torch.Tensor:
    """paired_attention of prepared fragments by tensor ops (other devices, no compiler, or the softmax and
    no_norm score norms), in slices of rows."""
    cols_as_query, rows_as_query = [], []
    for r in _context_slices(rows.mask, cols.mask):
        raw = _raw_scores(rows.vectors[r], cols.vectors)  # (slice, Lr, nC, Lc)
        cols_as_query.append(_attend(raw, rows[r], cols, raw_feature_norm, lambda_softmax))
        # The transposed copy of a slice is much cheaper than a second matmul over d.
        raw_rows_as_query = raw.permute(2, 3, 0, 1).contiguous()
        rows_as_query.append(_attend(raw_rows_as_query, cols, rows[r], raw_feature_norm, lambda_softmax))
    return torch.cat(cols_as_query) + torch.cat(rows_as_query, dim=1).T


def text_to_image_attention(words: torch.Tensor, blocks: torch.Tensor, raw_feature_norm: str = "clipped_l2norm",
                            lambda_softmax: float = 9.0) -> torch.Tensor:
    """Attention weights w (L words x K blocks) of one caption's words (L, d) over one image's blocks (K, d).

    Row l is softmax over blocks k of lambda * normalised raw scores <block_k, word_l> (docs/METHOD.md
    section 4, steps 1-3 of t2i, normalised over the caption's words); each row sums to 1.
    """
    query = Fragments.of(words[None], torch.tensor([words.size(0)], device=words.device))
    context = Fragments.of(blocks[None], torch.tensor([blocks.size(0)], device=blocks.device))
    logits = _attention_logits(_raw_scores(context.vectors, query.vectors), query.mask, context.mask,
                               raw_feature_norm, lambda_softmax)
    return logits.softmax(dim=1)[0, :, 0, :].T


def _attend_aligned(raw: torch.Tensor, context: Fragments, query: Fragments, norm: str,
                    lambda_softmax: float) -> torch.Tensor:
    """(P,) att(Q = query[p], C = context[p]) of aligned pairs; raw (P, Lc, Lq)."""
    per_pair_query = Fragments(query.vectors, query.mask[:, None, None], query.gram,
                               query.sq_norms[:, None, None])
    return _attend(raw[:, :, None], context, per_pair_query, norm, lambda_softmax)[:, 0]


def shortlist_attention(rows: Fragments, cols: Fragments, queries: torch.Tensor, candidates: torch.Tensor,
                        queries_are_rows: bool, raw_feature_norm: str = "clipped_l2norm",
                        lambda_softmax: float = 9.0) -> torch.Tensor:
    """(Q, K) att(Q = col, C = row) + att(Q = row, C = col) of each query with its K candidates only.

    rows / cols are a whole gallery's fragments (Fragments.of, prepared once); queries (Q,) index rows
    when queries_are_rows, else cols, and candidates (Q, K) index the other side. Equals the entries
    paired_attention gives these pairs; a query's fragments are used once, not copied K times.
    """
    n_queries, k = candidates.shape
    if queries_are_rows:
        listed = cols.vectors.index_select(0, candidates.reshape(-1)).view(n_queries, -1, cols.vectors.size(-1))
        raw = torch.bmm(rows.vectors.index_select(0, queries), listed.transpose(1, 2))  # (Q, Lr, K * Lc)
        raw = raw.view(n_queries, -1, k, cols.mask.size(1)).transpose(1, 2)
        row_ids, col_ids = queries[:, None].expand(-1, k), candidates
    else:
        listed = rows.vectors.index_select(0, candidates.reshape(-1)).view(n_queries, -1, rows.vectors.size(-1))
        raw = torch.bmm(listed, cols.vectors.index_select(0, queries).transpose(1, 2))  # (Q, K * Lr, Lc)
        row_ids, col_ids = candidates, queries[:, None].expand(-1, k)
    raw = raw.reshape(n_queries * k, rows.mask.size(1), cols.mask.size(1))  # (pairs, Lr, Lc)
    row_ids, col_ids = row_ids.reshape(-1), col_ids.reshape(-1)
    row_frags, col_frags = rows.select(row_ids), cols.select(col_ids)
    cols_as_query = _attend_aligned(raw, row_frags, col_frags, raw_feature_norm, lambda_softmax)
    rows_as_query = _attend_aligned(raw.transpose(1, 2).contiguous(), col_frags, row_frags, raw_feature_norm,
                                    lambda_softmax)
    return (cols_as_query + rows_as_query).view(n_queries, k)


class LocalModel(TwoBranchModel):
    """Fine-grained subnetwork: block and word encoders for the CNN and BoVW branches."""

    kind = "local"
    aux_weights = {"beta_1": 0.4, "beta_2": 0.4}  # weights of S_A1, S_A2 and their defaults (docs/METHOD.md section 5)

    def __init__(self, opt: dict, vocab_size: int):
        if opt["raw_feature_norm"] not in ATTENTION_NORMS:
            raise ValueError(f"unknown raw_feature_norm {opt['raw_feature_norm']!r}: "
                             f"use one of {ATTENTION_NORMS}")
        super().__init__(opt, vocab_size)
        self.raw_feature_norm = opt["raw_feature_norm"]
        self.lambda_softmax = float(opt["lambda_softmax"])

    def _paired(self, rows: torch.Tensor, row_lengths: torch.Tensor, cols: torch.Tensor,
                col_lengths: torch.Tensor) -> torch.Tensor:
        return paired_attention(rows, row_lengths, cols, col_lengths, self.raw_feature_norm,
                                self.lambda_softmax)

    def similarity(self, name: str, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """S_P, S_A1 or S_A2 (B, B) of block embeddings (B, 9, d) and padded word vectors (B, L, d)."""
        blocks = encoded["bovw"] if name == "A1" else encoded["cnn"]
        block_lengths = _block_lengths(blocks)
        if name == "A2":
            return self._paired(blocks, block_lengths, encoded["bovw"], block_lengths)
        words = encoded["bovw_words"] if name == "A1" else encoded["cnn_words"]
        return self._paired(blocks, block_lengths, words, encoded["lengths"])

    def encode_primary_texts(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CNN-branch word vectors (B, L, d) used for retrieval."""
        return self.txt_cnn(captions, lengths)

    def primary_similarity(self, images: torch.Tensor, texts: torch.Tensor,
                           text_lengths: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
        """S_P (N_img, N_txt) from encode_primary outputs, in chunk x chunk blocks of pairs."""
        image_lengths = _block_lengths(images)
        text_lengths = text_lengths.to(texts.device)
        row_blocks = []
        for r in range(0, images.size(0), chunk):
            row_blocks.append(torch.cat([
                self._paired(images[r:r + chunk], image_lengths[r:r + chunk],
                             texts[c:c + chunk], text_lengths[c:c + chunk])
                for c in range(0, texts.size(0), chunk)], dim=1))
        return torch.cat(row_blocks, dim=0)

    def gallery_fragments(self, images: torch.Tensor, texts: torch.Tensor,
                          text_lengths: torch.Tensor) -> tuple[Fragments, Fragments]:
        """Block and word fragments of encode_primary outputs, prepared once for shortlist_similarity."""
        return Fragments.of(images, _block_lengths(images)), Fragments.of(texts, text_lengths)

    def shortlist_similarity(self, images: Fragments, texts: Fragments, queries: torch.Tensor,
                             candidates: torch.Tensor, direction: str) -> torch.Tensor:
        """S_P (Q, K) of each query with its candidates: i2t = image queries, t2i = caption queries."""
        return shortlist_attention(images, texts, queries, candidates, direction == "i2t",
                                   self.raw_feature_norm, self.lambda_softmax)


def _block_lengths(blocks: torch.Tensor) -> torch.Tensor:
    """Every image has all of its blocks: lengths (B,) equal to the block count."""
    return torch.full((blocks.size(0),), blocks.size(1), dtype=torch.long, device=blocks.device)
