"""Plain looped reference of the local similarities (SPEC 4): one pair at a time, v_l built explicitly.

Slow on purpose; the batched model_local code is checked against it and benchmarked against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders import l2norm

COSINE_EPS = 1e-8


def normalise_over_query(scores: torch.Tensor, raw_feature_norm: str) -> torch.Tensor:
    """Step 2 on a (Lc, Lq) score matrix, over the query index l (dim 1)."""
    if raw_feature_norm == "clipped_l2norm":
        return l2norm(F.leaky_relu(scores, 0.1), dim=1)
    if raw_feature_norm == "l2norm":
        return l2norm(scores, dim=1)
    if raw_feature_norm == "softmax":
        return torch.softmax(scores, dim=1)
    if raw_feature_norm == "no_norm":
        return scores
    raise ValueError(f"unknown raw_feature_norm {raw_feature_norm!r}")


def attention(query: torch.Tensor, context: torch.Tensor, raw_feature_norm: str = "clipped_l2norm",
              lambda_softmax: float = 9.0) -> torch.Tensor:
    """att(Q, C) for unpadded query (Lq, d) and context (Lc, d): a scalar."""
    scores = context @ query.T  # a[k, l] = <C_k, Q_l>
    weights = torch.softmax(lambda_softmax * normalise_over_query(scores, raw_feature_norm), dim=0)
    attended = weights.T @ context  # v_l = sum_k w_kl C_k
    norm_product = query.norm(dim=1) * attended.norm(dim=1)
    cosines = (query * attended).sum(dim=1) / norm_product.clamp_min(COSINE_EPS)
    return cosines.mean()


def reference_cross_attention(query: torch.Tensor, query_lengths: torch.Tensor, context: torch.Tensor,
                              context_lengths: torch.Tensor, raw_feature_norm: str = "clipped_l2norm",
                              lambda_softmax: float = 9.0) -> torch.Tensor:
    """(nQ, nC) matrix of att(query[a][:len], context[b][:len]), one pair at a time."""
    rows = []
    for a in range(query.size(0)):
        q = query[a, :int(query_lengths[a])]
        rows.append(torch.stack([
            attention(q, context[b, :int(context_lengths[b])], raw_feature_norm, lambda_softmax)
            for b in range(context.size(0))]))
    return torch.stack(rows)


def reference_text_image(blocks: torch.Tensor, words: torch.Tensor, word_lengths: torch.Tensor,
                         raw_feature_norm: str = "clipped_l2norm",
                         lambda_softmax: float = 9.0) -> torch.Tensor:
    """(N_img, N_txt) t2i + i2t: att(Q = words j, C = blocks i) + att(Q = blocks i, C = words j)."""
    rows = []
    for i in range(blocks.size(0)):
        pairs = []
        for j in range(words.size(0)):
            caption = words[j, :int(word_lengths[j])]
            pairs.append(attention(caption, blocks[i], raw_feature_norm, lambda_softmax)
                         + attention(blocks[i], caption, raw_feature_norm, lambda_softmax))
        rows.append(torch.stack(pairs))
    return torch.stack(rows)


def reference_cnn_bovw(cnn_blocks: torch.Tensor, bovw_blocks: torch.Tensor,
                       raw_feature_norm: str = "clipped_l2norm",
                       lambda_softmax: float = 9.0) -> torch.Tensor:
    """(B, B) S_A2: att(Q = CNN blocks i, C = BoVW blocks j) + att(Q = BoVW blocks j, C = CNN blocks i)."""
    return torch.stack([torch.stack([
        attention(cnn_blocks[i], bovw_blocks[j], raw_feature_norm, lambda_softmax)
        + attention(bovw_blocks[j], cnn_blocks[i], raw_feature_norm, lambda_softmax)
        for j in range(bovw_blocks.size(0))]) for i in range(cnn_blocks.size(0))])


def reference_forward(model: nn.Module, cnn: torch.Tensor, bovw: torch.Tensor, captions: torch.Tensor,
                      lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """S_P, S_A1, S_A2 with the model's own encoders and the looped attention."""
    norm, lam = model.raw_feature_norm, model.lambda_softmax
    cnn_blocks, bovw_blocks = model.img_cnn(cnn), model.img_bovw(bovw)
    cnn_words, bovw_words = model.txt_cnn(captions, lengths), model.txt_bovw(captions, lengths)
    return {
        "P": reference_text_image(cnn_blocks, cnn_words, lengths, norm, lam),
        "A1": reference_text_image(bovw_blocks, bovw_words, lengths, norm, lam),
        "A2": reference_cnn_bovw(cnn_blocks, bovw_blocks, norm, lam),
    }


def reference_attention_weights(query: torch.Tensor, context: torch.Tensor, raw_feature_norm: str = "clipped_l2norm",
                                lambda_softmax: float = 9.0) -> torch.Tensor:
    """(Lq, Lc) weights w_kl of SPEC 4 steps 1-3, one score at a time: row l is query fragment l."""
    scores = torch.zeros(context.size(0), query.size(0), dtype=query.dtype)
    for k in range(context.size(0)):
        for l in range(query.size(0)):
            scores[k, l] = (context[k] * query[l]).sum()
    normed = normalise_over_query(scores, raw_feature_norm)
    weights = torch.zeros(query.size(0), context.size(0), dtype=query.dtype)
    for l in range(query.size(0)):
        exps = [torch.exp(lambda_softmax * normed[k, l]) for k in range(context.size(0))]
        for k in range(context.size(0)):
            weights[l, k] = exps[k] / sum(exps)
    return weights
