"""Retrieval metrics over a whole ranked gallery (docs/METHOD.md section 7): mAP@all, Recall@K, precision@K."""
from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10)
RELEVANCE = ("label", "instance")  # evaluation protocols, docs/METHOD.md section 7


def relevance(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Boolean (len(a), len(b)): same label for (N,) / (N, 1) labels, any shared label for multi-hot (N, C).

    The one definition of "relevant": the positives of the training losses and the hits of every metric.
    """
    if labels_a.dim() == 2 and labels_a.size(1) > 1:
        return (labels_a.float() @ labels_b.float().T) > 0
    return labels_a.reshape(-1, 1) == labels_b.reshape(1, -1)


def _ranked_relevance(sims: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> torch.Tensor:
    """Relevance of each query's gallery in ranked order: similarity descending, ties in gallery order."""
    order = torch.sort(torch.from_numpy(sims), dim=1, descending=True, stable=True).indices  # multithreaded
    rel = relevance(torch.from_numpy(query_labels), torch.from_numpy(gallery_labels))
    return torch.gather(rel, 1, order)


def chunk_sums(sims: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-query AP, hits in top K and relevant count for one chunk of queries."""
    return ranked_sums(_ranked_relevance(sims, query_labels, gallery_labels), ks)


def ranked_sums(ranked: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, np.ndarray]:
    """Per-query AP, hits in top K and relevant count of ranked relevance lists (queries, length).

    AP is normalised by the relevant items in the list: over the whole gallery that is mAP@all, over a
    top-K list it is mAP@K.
    """
    rows, cols = ranked.nonzero(as_tuple=True)  # relevant items, row-major: ranks ascending per query
    n_rel = torch.bincount(rows, minlength=ranked.shape[0])
    first = torch.cumsum(n_rel, 0) - n_rel
    hits_so_far = torch.arange(1, len(rows) + 1) - first[rows]
    precision_at_hits = hits_so_far.double() / (cols + 1).double()
    ap = torch.zeros(ranked.shape[0], dtype=torch.float64).index_add_(0, rows, precision_at_hits)
    out = {"ap": (ap / n_rel.clamp_min(1)).numpy(), "n_rel": n_rel.numpy()}
    for k in ks:
        in_top = ranked[:, :k].sum(dim=1)
        out[f"hit@{k}"] = (in_top > 0).numpy()
        out[f"prec@{k}"] = (in_top.double() / k).numpy()
    return out


def summarize_queries(parts: list[dict[str, np.ndarray]], kept: np.ndarray | None = None) -> dict[str, float]:
    """Means (percent) of ranked_sums parts over the kept queries (default: those with a relevant item)."""
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    n_rel = merged.pop("n_rel")
    kept = n_rel > 0 if kept is None else kept
    result = {"mAP": 100 * float(merged.pop("ap")[kept].mean()) if kept.any() else 0.0}
    for key, values in merged.items():
        name = key.replace("hit@", "R@").replace("prec@", "P@")
        result[name] = 100 * float(values[kept].mean()) if kept.any() else 0.0
    result["no_relevant"] = int((~kept).sum())
    return result


def ranking_metrics(sims: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                    ks: tuple[int, ...] = KS, chunk: int = 1000) -> dict[str, float]:
    """mAP, R@K and P@K (percent) of queries (rows of sims) ranking the gallery (columns).

    Queries with no relevant gallery item are left out of every mean and counted in `no_relevant`.
    """
    sims = np.asarray(sims, dtype=np.float64)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    return summarize_queries([chunk_sums(sims[i:i + chunk], query_labels[i:i + chunk], gallery_labels, ks)
                              for i in range(0, sims.shape[0], chunk)])


def instance_labels(n_images: int, n_captions: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ids of the rows and of the captions (caption j describes image j // k): as labels they make a
    caption relevant only to its own image, the instance-level protocol."""
    if n_images < 1 or n_captions % n_images:
        raise ValueError(f"{n_captions} captions are not k per image for {n_images} images")
    return np.arange(n_images), np.arange(n_captions) // (n_captions // n_images)


def protocol_labels(relevance: str, image_labels: np.ndarray, caption_labels: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The labels that decide relevance under a protocol: the items' own (label) or their image ids (instance)."""
    if relevance == "instance":
        return instance_labels(len(image_labels), len(caption_labels))
    return np.asarray(image_labels), np.asarray(caption_labels)


def add_rsum(result: dict, relevance: str = "label") -> dict:
    """The model-selection and fusion-tuning score of a protocol: label, rsum = i2t mAP + t2i mAP;
    instance, rsum = the sum of i2t and t2i R@1/5/10 (the field's rsum) and mR = rsum / 6."""
    if relevance == "instance":
        result["rsum"] = sum(result[d][f"R@{k}"] for d in ("i2t", "t2i") for k in KS)
        result["mR"] = result["rsum"] / (2 * len(KS))
    else:
        result["rsum"] = result["i2t"]["mAP"] + result["t2i"]["mAP"]
    return result


def retrieval_metrics(sims: np.ndarray, image_labels: np.ndarray, text_labels: np.ndarray,
                      chunk: int = 1000, relevance: str = "label") -> dict[str, dict[str, float]]:
    """i2t (image queries over captions) and t2i metrics of an (images x captions) similarity matrix under
    a relevance protocol (see protocol_labels), with its rsum (see add_rsum)."""
    sims = np.asarray(sims)
    if relevance == "instance":
        images, captions = instance_labels(*sims.shape)
        k = sims.shape[1] // sims.shape[0]
        result = {"i2t": own_items_metrics(sims, images[:, None] * k + np.arange(k)[None], chunk=chunk),
                  "t2i": own_items_metrics(sims.T, captions[:, None], chunk=chunk)}
    else:
        result = {"i2t": ranking_metrics(sims, image_labels, text_labels, chunk=chunk),
                  "t2i": ranking_metrics(sims.T, text_labels, image_labels, chunk=chunk)}
    return add_rsum(result, relevance)


def own_items_sums(sims: torch.Tensor, own: torch.Tensor, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """ranked_sums of queries whose relevant items are the listed gallery columns `own` (Q, r), without
    sorting the gallery: an item's 0-based rank is the count of higher scores plus equal scores at lower
    gallery indices (ties in gallery order), one (Q, G) comparison per relevant item."""
    columns = torch.arange(sims.size(1))[None]
    own_scores = sims.gather(1, own)
    ranks = torch.stack([(sims > own_scores[:, [t]]).sum(1)
                         + ((sims == own_scores[:, [t]]) & (columns < own[:, [t]])).sum(1)
                         for t in range(own.size(1))], dim=1).sort(dim=1).values
    hits_so_far = torch.arange(1, own.size(1) + 1, dtype=torch.float64)[None]
    out = {"ap": (hits_so_far / (ranks + 1).double()).mean(dim=1).numpy(),
           "n_rel": np.full(own.size(0), own.size(1))}
    for k in ks:
        in_top = (ranks < k).sum(dim=1)
        out[f"hit@{k}"] = (in_top > 0).numpy()
        out[f"prec@{k}"] = (in_top.double() / k).numpy()
    return out


def own_items_metrics(sims: np.ndarray, own: np.ndarray, ks: tuple[int, ...] = KS,
                      chunk: int = 1000) -> dict[str, float]:
    """ranking_metrics when each query's relevant items are known gallery columns (the instance protocol:
    an image's k captions, a caption's image); the same numbers, cheaper than sorting every gallery."""
    sims, own = torch.from_numpy(np.asarray(sims, dtype=np.float64)), torch.from_numpy(own)
    return summarize_queries([own_items_sums(sims[i:i + chunk], own[i:i + chunk], ks)
                              for i in range(0, sims.size(0), chunk)])


def duplicate_captions(captions: list[str], captions_per_image: int) -> dict[str, int]:
    """Captions whose identical string (whitespace-trimmed) also describes another image, and the distinct
    strings: under the instance protocol such a twin counts as not relevant; nothing is dropped or merged."""
    images_of: dict[str, set[int]] = {}
    for j, caption in enumerate(captions):
        images_of.setdefault(caption.strip(), set()).add(j // captions_per_image)
    return {"captions_with_a_twin_of_another_image": sum(len(images_of[c.strip()]) > 1 for c in captions),
            "distinct_strings": len(images_of)}


def precision_recall_curve(sims: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                           levels: np.ndarray = np.linspace(0.0, 1.0, 11), chunk: int = 1000) -> np.ndarray:
    """Interpolated precision (max precision at recall >= level), averaged over queries with a relevant item."""
    totals, count = np.zeros(len(levels)), 0
    for i in range(0, sims.shape[0], chunk):
        ranked = _ranked_relevance(sims[i:i + chunk], query_labels[i:i + chunk], gallery_labels).numpy()
        ranked = ranked[ranked.any(axis=1)]
        hits = np.cumsum(ranked, axis=1)
        precision = hits / np.arange(1, ranked.shape[1] + 1)
        recall = hits / hits[:, -1:]
        # Best precision from each rank onwards, then read at the first rank reaching each level.
        best_after = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        for j, level in enumerate(levels):
            first = np.argmax(recall >= level - 1e-12, axis=1)
            totals[j] += best_after[np.arange(len(first)), first].sum()
        count += len(ranked)
    return totals / max(count, 1)
