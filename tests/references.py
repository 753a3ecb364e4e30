"""Plain, looped reference implementations of the formulas of docs/METHOD.md sections 3-5 and 7.

Slow on purpose and written straight from the formulas of docs/METHOD.md: one anchor / query / caption / pair at a
time, no masking tricks. The vectorised project code is tested against these, and benchmark scripts
import them (`msb_loss_reference`, `map_reference`).
"""
from __future__ import annotations

import numpy as np
import torch

L2_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Labels: "relevant" = same label, or shares at least one label for multi-hot (N, C) labels (docs/METHOD.md section 1)
# ----------------------------------------------------------------------------------------------

def _label_rows(labels) -> list:
    """Each item's label as a Python value: an int for (N,) / (N, 1), a set of classes for (N, C>1)."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] > 1:
        return [frozenset(int(c) for c in range(arr.shape[1]) if arr[i, c] != 0) for i in range(arr.shape[0])]
    return [arr.reshape(-1)[i].item() for i in range(arr.reshape(-1).shape[0])]


def is_relevant(a, b) -> bool:
    """Relevance of two labels as returned by _label_rows."""
    if isinstance(a, frozenset):
        return len(a & b) > 0
    return a == b


# ----------------------------------------------------------------------------------------------
# Encoders (docs/METHOD.md section 3)
# ----------------------------------------------------------------------------------------------

def l2norm_reference(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(sum((x + eps)^2)) on the last axis, one vector at a time."""
    flat = x.reshape(-1, x.shape[-1])
    rows = []
    for v in flat:
        denom = torch.sqrt(sum((v[k] + eps) ** 2 for k in range(v.shape[0])))
        rows.append(torch.stack([v[k] / denom for k in range(v.shape[0])]))
    return torch.stack(rows).reshape(x.shape)


def gru_direction_reference(inputs: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                            b_ih: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """One GRU direction over a (T, in) sequence from h_0 = 0, PyTorch's gate equations, one step at a time.

    r = sig(W_ir x + b_ir + W_hr h + b_hr); z = sig(W_iz x + b_iz + W_hz h + b_hz);
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) * n + z * h.
    """
    hidden = w_hh.shape[1]
    h = torch.zeros(hidden, dtype=inputs.dtype)
    outs = []
    for x in inputs:
        gi = w_ih @ x + b_ih
        gh = w_hh @ h + b_hh
        r = torch.sigmoid(gi[:hidden] + gh[:hidden])
        z = torch.sigmoid(gi[hidden:2 * hidden] + gh[hidden:2 * hidden])
        n = torch.tanh(gi[2 * hidden:] + r * gh[2 * hidden:])
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs)


def text_encoder_reference(encoder, token_ids) -> torch.Tensor:
    """Word vectors (T, d) of ONE caption given as its true-length token ids, from the encoder's weights.

    Embedding lookup, hand-written 1-layer GRU forward over the sequence and (if bidirectional)
    backward over the reversed sequence, (fwd + bwd) / 2, then each word vector L2-normalised.
    """
    rnn = encoder.rnn
    assert rnn.num_layers == 1, "the reference covers the 1-layer GRU of docs/METHOD.md section 3"
    ids = [int(t) for t in token_ids]
    x = torch.stack([encoder.embed.weight[t] for t in ids])
    fwd = gru_direction_reference(x, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    if rnn.bidirectional:
        bwd = gru_direction_reference(x.flip(0), rnn.weight_ih_l0_reverse, rnn.weight_hh_l0_reverse,
                                      rnn.bias_ih_l0_reverse, rnn.bias_hh_l0_reverse).flip(0)
        words = (fwd + bwd) / 2
    else:
        words = fwd
    return l2norm_reference(words)


def pool_words_reference(words: torch.Tensor, lengths, mode: str = "padded_mean") -> torch.Tensor:
    """Caption vectors from word vectors (B, L, d): sum of the first length_i word vectors, divided by
    the longest caption length of the batch (padded_mean) or by length_i (masked_mean)."""
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    out = []
    for i, n in enumerate(lengths):
        total = torch.zeros(words.shape[-1], dtype=words.dtype)
        for t in range(n):
            total = total + words[i, t]
        out.append(total / (longest if mode == "padded_mean" else n))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# Global similarities (docs/METHOD.md section 4)
# ----------------------------------------------------------------------------------------------

def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sum(u[k] * v[k] for k in range(u.shape[0]))


def inner_product_matrix(rows: list, cols: list) -> torch.Tensor:
    """M[i, j] = <rows[i], cols[j]>, one pair at a time."""
    return torch.stack([torch.stack([_dot(r, c) for c in cols]) for r in rows])


def global_similarity_reference(model, cnn: torch.Tensor, bovw: torch.Tensor, captions: torch.Tensor,
                                lengths, pooling: str) -> dict[str, torch.Tensor]:
    """S_P = <c_i, t_c,j>, S_A1 = <b_i, t_b,j>, S_A2 = <c_i, b_j> from the model's own encoder modules.

    Each image is encoded alone; each caption is encoded alone over its true length, then pooled by
    the rule of docs/METHOD.md section 3 (batch-longest or own length).
    """
    lengths = [int(n) for n in lengths]
    longest = max(lengths)
    c = [model.img_cnn(cnn[i:i + 1])[0] for i in range(cnn.shape[0])]
    b = [model.img_bovw(bovw[i:i + 1])[0] for i in range(bovw.shape[0])]

    def caption_vectors(encoder):
        vecs = []
        for j, n in enumerate(lengths):
            words = encoder(captions[j:j + 1, :n], torch.tensor([n]))[0]
            total = torch.zeros(words.shape[-1], dtype=words.dtype)
            for t in range(n):
                total = total + words[t]
            vecs.append(total / (longest if pooling == "padded_mean" else n))
        return vecs

    t_c, t_b = caption_vectors(model.txt_cnn), caption_vectors(model.txt_bovw)
    return {"P": inner_product_matrix(c, t_c), "A1": inner_product_matrix(b, t_b),
            "A2": inner_product_matrix(c, b)}


# ----------------------------------------------------------------------------------------------
# MSB loss (docs/METHOD.md section 5)
# ----------------------------------------------------------------------------------------------

def _mined_sets(values: list, positive: list, delta: float) -> tuple[list[int], list[int]]:
    """Indices of kept positives and kept negatives of one anchor, mined on the unmined sets."""
    pos = [j for j in range(len(values)) if positive[j]]
    neg = [j for j in range(len(values)) if not positive[j]]
    if not pos or not neg:
        return [], []
    v = [float(x.detach()) for x in values]  # mining compares values; no gradient flows through it
    max_neg = max(v[j] for j in neg)
    min_pos = min(v[j] for j in pos)
    kept_pos = [j for j in pos if v[j] < max_neg + delta]
    kept_neg = [j for j in neg if v[j] > min_pos - delta]
    return kept_pos, kept_neg


def _spring_term(values: list, kept_pos: list[int], kept_neg: list[int], g1: float, g2: float):
    pos_sum = sum(torch.exp(g2 - g1 * values[j]) for j in kept_pos)
    neg_sum = sum(torch.exp(g1 * values[j] - g2) for j in kept_neg)
    return torch.log(pos_sum) / g1 + torch.log(neg_sum) / g1


def msb_anchor_terms(sims: torch.Tensor, labels, g1: float = 1.0, g2: float = 0.5,
                     delta: float = 0.1) -> list:
    """Per anchor i: (row term, column term), or None when the anchor is skipped."""
    lab = _label_rows(labels)
    n = sims.shape[0]
    terms = []
    for i in range(n):
        row = [sims[i, j] for j in range(n)]
        col = [sims[j, i] for j in range(n)]
        positive = [is_relevant(lab[i], lab[j]) for j in range(n)]
        row_pos, row_neg = _mined_sets(row, positive, delta)
        col_pos, col_neg = _mined_sets(col, positive, delta)
        if not row_pos or not row_neg or not col_pos or not col_neg:
            terms.append(None)
            continue
        terms.append((_spring_term(row, row_pos, row_neg, g1, g2), _spring_term(col, col_pos, col_neg, g1, g2)))
    return terms


def msb_loss_reference(sims: torch.Tensor, labels, g1: float = 1.0, g2: float = 0.5,
                       delta: float = 0.1) -> torch.Tensor:
    """MSB loss looped over anchors: (sum of row terms + sum of column terms) / B; 0 if none survive.

    Differentiable w.r.t. `sims` (mining thresholds are comparisons only).
    """
    total = sims.sum() * 0.0  # keeps the graph (and dtype) when no anchor survives
    for term in msb_anchor_terms(sims, labels, g1, g2, delta):
        if term is not None:
            total = total + term[0] + term[1]
    return total / sims.shape[0]


def triplet_loss_reference(sims: torch.Tensor, labels, margin: float = 0.2) -> torch.Tensor:
    """VSE++ max-violation loss looped over anchors, both directions.

    Row anchor i: the mean over its positives j of max(0, margin - s[i, j] + max over negatives n of s[i, n]);
    column anchor j: the same over column j. The loss is the sum of all row and column anchor terms; an
    anchor without a positive or without a negative adds nothing.
    """
    lab = _label_rows(labels)
    n = sims.shape[0]
    total = sims.sum() * 0.0
    for a in range(n):
        for line in ([sims[a, j] for j in range(n)], [sims[j, a] for j in range(n)]):
            positive = [is_relevant(lab[a], lab[j]) for j in range(n)]
            pos = [j for j in range(n) if positive[j]]
            neg = [j for j in range(n) if not positive[j]]
            if not pos or not neg:
                continue
            hardest = torch.stack([line[j] for j in neg]).max()
            hinges = [torch.clamp(margin - line[j] + hardest, min=0.0) for j in pos]
            total = total + sum(hinges) / len(pos)
    return total


# ----------------------------------------------------------------------------------------------
# Retrieval metrics (docs/METHOD.md section 7)
# ----------------------------------------------------------------------------------------------

def ranked_relevance(sim_row, query_label, gallery_labels: list) -> list[bool]:
    """Relevance of the gallery in ranked order: similarity descending, ties by gallery index."""
    order = sorted(range(len(sim_row)), key=lambda j: (-float(sim_row[j]), j))
    return [is_relevant(query_label, gallery_labels[j]) for j in order]


def average_precision_reference(ranked: list[bool]) -> float:
    """(1/R) sum over relevant ranks k of precision@k (ranks 1-based)."""
    hits, total = 0, 0.0
    for k, rel in enumerate(ranked, start=1):
        if rel:
            hits += 1
            total += hits / k
    return total / hits


def ranking_metrics_reference(sims, query_labels, gallery_labels, ks=(1, 5, 10)) -> dict:
    """mAP, R@K (a relevant item in the top K), P@K (relevant share of the top K), all in percent,
    over queries with a relevant item; `no_relevant` counts the others."""
    sims = np.asarray(sims, dtype=np.float64)
    q_lab, g_lab = _label_rows(query_labels), _label_rows(gallery_labels)
    aps, hits, precs, skipped = [], {k: [] for k in ks}, {k: [] for k in ks}, 0
    for q in range(sims.shape[0]):
        ranked = ranked_relevance(sims[q], q_lab[q], g_lab)
        if not any(ranked):
            skipped += 1
            continue
        aps.append(average_precision_reference(ranked))
        for k in ks:
            hits[k].append(1.0 if any(ranked[:k]) else 0.0)
            precs[k].append(sum(ranked[:k]) / k)
    return _percent_means(aps, hits, precs, skipped)


def _percent_means(aps: list, hits: dict, precs: dict, skipped: int) -> dict:
    """mAP, R@K and P@K in percent over the kept queries, and how many queries were left out."""
    out = {"mAP": 100 * sum(aps) / len(aps) if aps else 0.0}
    for k in hits:
        out[f"R@{k}"] = 100 * sum(hits[k]) / len(aps) if aps else 0.0
        out[f"P@{k}"] = 100 * sum(precs[k]) / len(aps) if aps else 0.0
    out["no_relevant"] = skipped
    return out


def shortlist_metrics_reference(global_sims, rerank_sims, query_labels, gallery_labels, shortlist: int,
                                ks=(1, 5, 10)) -> dict:
    """mAP@K, R@K, P@K (percent) of a shortlist, one query at a time: the top `shortlist` items by global
    score (ties by gallery index) re-ordered by rerank_sims (ties by gallery index); AP over that list
    divided by the relevant items in it (0 if none); queries with no relevant gallery item left out."""
    global_sims, rerank_sims = np.asarray(global_sims, np.float64), np.asarray(rerank_sims, np.float64)
    q_lab, g_lab = _label_rows(query_labels), _label_rows(gallery_labels)
    aps, hits, precs, skipped = [], {k: [] for k in ks}, {k: [] for k in ks}, 0
    for q in range(global_sims.shape[0]):
        if not any(is_relevant(q_lab[q], g) for g in g_lab):
            skipped += 1
            continue
        listed = sorted(range(len(g_lab)), key=lambda j: (-global_sims[q, j], j))[:shortlist]
        listed = sorted(listed, key=lambda j: (-rerank_sims[q, j], j))
        ranked = [is_relevant(q_lab[q], g_lab[j]) for j in listed]
        aps.append(average_precision_reference(ranked) if any(ranked) else 0.0)
        for k in ks:
            hits[k].append(1.0 if any(ranked[:k]) else 0.0)
            precs[k].append(sum(ranked[:k]) / k)
    return _percent_means(aps, hits, precs, skipped)


def instance_metrics_reference(sims, captions_per_image: int, ks=(1, 5, 10)) -> dict:
    """Instance-level protocol, one query at a time: caption j is relevant only to image j // k.

    i2t: image i ranks all captions (ties by caption index), its relevant items are captions i*k .. i*k+k-1;
    t2i: caption j ranks all images, its one relevant item is image j // k. R@K (a relevant item in the top
    K) and AP in percent per direction; mR = mean of the six R@K; rsum = their sum.
    """
    sims = np.asarray(sims, dtype=np.float64)
    n_images, n_captions = sims.shape
    out = {}
    for direction in ("i2t", "t2i"):
        aps, hits = [], {k: [] for k in ks}
        n_queries = n_images if direction == "i2t" else n_captions
        for q in range(n_queries):
            if direction == "i2t":
                scores = [sims[q, j] for j in range(n_captions)]
                is_own = [j // captions_per_image == q for j in range(n_captions)]
            else:
                scores = [sims[i, q] for i in range(n_images)]
                is_own = [i == q // captions_per_image for i in range(n_images)]
            order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
            ranked = [is_own[j] for j in order]
            aps.append(average_precision_reference(ranked))
            for k in ks:
                hits[k].append(1.0 if any(ranked[:k]) else 0.0)
        out[direction] = {"mAP": 100 * sum(aps) / len(aps), **{f"R@{k}": 100 * sum(hits[k]) / len(aps) for k in ks}}
    out["rsum"] = sum(out[d][f"R@{k}"] for d in ("i2t", "t2i") for k in ks)
    out["mR"] = out["rsum"] / (2 * len(ks))
    return out


def map_reference(sims, query_labels, gallery_labels) -> float:
    """mAP@all in percent over the queries (rows of sims) that have a relevant gallery item."""
    sims = np.asarray(sims, dtype=np.float64)
    q_lab, g_lab = _label_rows(query_labels), _label_rows(gallery_labels)
    aps = []
    for q in range(sims.shape[0]):
        ranked = ranked_relevance(sims[q], q_lab[q], g_lab)
        if any(ranked):
            aps.append(average_precision_reference(ranked))
    return 100 * sum(aps) / len(aps) if aps else 0.0


def precision_recall_reference(sims, query_labels, gallery_labels, levels=np.linspace(0.0, 1.0, 11),
                               tol: float = 1e-9) -> np.ndarray:
    """Interpolated precision at each recall level: max precision over ranks whose recall >= level
    (level compared with a tiny tolerance, as 0.3 is not exact in binary), averaged over queries with
    a relevant item."""
    sims = np.asarray(sims, dtype=np.float64)
    q_lab, g_lab = _label_rows(query_labels), _label_rows(gallery_labels)
    totals, count = [0.0] * len(levels), 0
    for q in range(sims.shape[0]):
        ranked = ranked_relevance(sims[q], q_lab[q], g_lab)
        n_rel = sum(ranked)
        if n_rel == 0:
            continue
        count += 1
        points, hits = [], 0
        for k, rel in enumerate(ranked, start=1):
            hits += rel
            points.append((hits / n_rel, hits / k))
        for li, level in enumerate(levels):
            totals[li] += max(p for r, p in points if r >= level - tol)
    return np.array([t / max(count, 1) for t in totals])


__all__ = [
    "l2norm_reference", "gru_direction_reference", "text_encoder_reference", "pool_words_reference",
    "inner_product_matrix", "global_similarity_reference", "msb_anchor_terms", "msb_loss_reference",
    "ranked_relevance", "average_precision_reference", "ranking_metrics_reference", "map_reference",
    "precision_recall_reference", "is_relevant", "instance_metrics_reference",
    "triplet_loss_reference",
]
