"""Evaluation on large galleries (evaluate.py --shortlist K): the N x M score matrix is never held.

1. Global shortlists: global scores in blocks of image rows; each image query keeps its top K captions,
   each caption query a running top K of images, ties to the lower gallery index.
2. Local re-ranking: the local subnetwork scores only each query's K shortlisted items.
3. Each row (global, local, fused = w global + (1 - w) local) ranks the shortlist, ties in gallery order.

Metrics: mAP@K = AP over a query's top-K list, normalised by the relevant items retrieved in that list
(0 when none is), averaged over the queries that have a relevant item in the whole gallery; with K = N it
is mAP@all and every number equals the full evaluation. R@1/5/10 and P@1/5/10 come from the same list.
Global mAP@all over the whole gallery runs in blocks of queries (bounded memory).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from evaluation import Subnetwork
from metrics import KS, add_rsum, chunk_sums, protocol_labels, ranked_sums, relevance, summarize_queries
from runtime.errors import InputError
from runtime.files import atomic_write_bytes
from runtime.provenance import sha256_file
from scoring import encode_split

# Elements of one block of scores or relevance: 128 MB in float32.
BLOCK_ELEMENTS = 1 << 25
PAIRS_PER_CALL = 2048  # (query, candidate) pairs per call: blocks small enough to reuse freed memory
EMBEDDING_FILES = ("images", "captions", "image_labels", "caption_labels")

# (query ids (Q,), candidate ids (Q, K), "i2t" or "t2i") -> local S_P (Q, K)
ShortlistScorer = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]


@dataclass
class Shortlist:
    """Each query's K gallery items ranked by global score (descending, ties by gallery index)."""

    scores: torch.Tensor  # (Q, K)
    items: torch.Tensor  # (Q, K) gallery indices


def keep_top(scores: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each row; rows list candidates by ascending gallery index, ties go to the
    lower index, and the kept ones stay in ascending index order."""
    items = items.expand_as(scores)
    if scores.size(1) <= k:
        return scores, items
    top = scores.topk(k, dim=1, sorted=False)
    threshold = top.values.min(dim=1, keepdim=True).values
    columns = top.indices.sort(dim=1).values
    # topk picks arbitrarily among values tied with the k-th best; only those rows need the tie rule.
    tied_rows = ((scores >= threshold).sum(dim=1) > k).nonzero()[:, 0]
    if len(tied_rows):
        columns[tied_rows] = _lowest_tied_columns(scores[tied_rows], threshold[tied_rows], k)
    return scores.gather(1, columns), items.gather(1, columns)


def _lowest_tied_columns(scores: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending columns of each row's k best when the k-th best value is tied: lower columns win ties."""
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= room))
    return chosen.nonzero()[:, 1].view(-1, k)


def rank(scores: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted by score descending, ties by gallery index ascending."""
    by_index = items.argsort(dim=1, stable=True)
    scores, items = scores.gather(1, by_index), items.gather(1, by_index)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    return scores.gather(1, order), items.gather(1, order)


def global_shortlists(images: torch.Tensor, texts: torch.Tensor, k: int) -> tuple[Shortlist, Shortlist]:
    """i2t (image queries over captions) and t2i top-k shortlists of the scores images @ texts.T."""
    n_images, n_texts = images.size(0), texts.size(0)
    step = max(1, BLOCK_ELEMENTS // n_texts)
    caption_ids = torch.arange(n_texts, device=texts.device)[None]
    i2t_scores, i2t_items = [], []
    t2i_scores = texts.new_empty((n_texts, 0))
    t2i_items = torch.empty((n_texts, 0), dtype=torch.long, device=texts.device)
    for start in range(0, n_images, step):
        block = images[start:start + step] @ texts.T
        scores, items = keep_top(block, caption_ids, k)
        i2t_scores.append(scores)
        i2t_items.append(items)
        image_ids = torch.arange(start, start + block.size(0), device=texts.device)[None]
        # Earlier images have lower indices, so the running list stays in ascending gallery order.
        t2i_scores, t2i_items = keep_top(torch.cat([t2i_scores, block.T], dim=1),
                                         torch.cat([t2i_items, image_ids.expand(n_texts, -1)], dim=1), k)
    return (Shortlist(*rank(torch.cat(i2t_scores), torch.cat(i2t_items))),
            Shortlist(*rank(t2i_scores, t2i_items)))


def shortlist_local_scores(shortlist: Shortlist, direction: str, scorer: ShortlistScorer) -> torch.Tensor:
    """Local S_P (Q, K) of each query and its shortlisted items, about PAIRS_PER_CALL pairs per call."""
    n_queries, k = shortlist.items.shape
    step = max(1, PAIRS_PER_CALL // k)
    queries = torch.arange(n_queries, device=shortlist.items.device)
    return torch.cat([scorer(queries[q:q + step], shortlist.items[q:q + step], direction)
                      for q in range(0, n_queries, step)])


def shortlist_metrics(rows: dict[str, torch.Tensor], shortlist: Shortlist, query_labels: torch.Tensor,
                      gallery_labels: torch.Tensor) -> dict[str, dict]:
    """Metrics of each row's ranking of the shortlist; queries without any relevant gallery item are left out."""
    step = max(1, BLOCK_ELEMENTS // len(gallery_labels))
    ranked_items = {name: rank(scores.cpu(), shortlist.items.cpu())[1] for name, scores in rows.items()}
    parts: dict[str, list] = {name: [] for name in rows}
    kept = []
    for start in range(0, len(query_labels), step):
        rel = relevance(query_labels[start:start + step], gallery_labels)
        kept.append(rel.any(dim=1).numpy())
        for name, items in ranked_items.items():
            parts[name].append(ranked_sums(rel.gather(1, items[start:start + step]), KS))
    kept = np.concatenate(kept)
    return {name: summarize_queries(name_parts, kept) for name, name_parts in parts.items()}


def shortlist_results(images: torch.Tensor, texts: torch.Tensor, image_labels: torch.Tensor,
                      text_labels: torch.Tensor, k: int, scorer: ShortlistScorer | None = None,
                      weight: float | None = None, relevance: str = "label") -> dict[str, dict]:
    """i2t / t2i mAP@K, R@K, P@K of the global row, and of the local and fused rows when a local
    scorer is given; same layout as metrics.retrieval_metrics (labels already those of the protocol)."""
    i2t, t2i = global_shortlists(images, texts, k)
    results: dict[str, dict] = {}
    for direction, shortlist, query_labels, gallery_labels in (("i2t", i2t, image_labels, text_labels),
                                                               ("t2i", t2i, text_labels, image_labels)):
        rows = {"global": shortlist.scores}
        if scorer is not None:
            rows["local"] = shortlist_local_scores(shortlist, direction, scorer).to(shortlist.scores)
            if weight is not None:
                rows["fused"] = weight * rows["global"] + (1 - weight) * rows["local"]
        for name, metrics in shortlist_metrics(rows, shortlist, query_labels, gallery_labels).items():
            results.setdefault(name, {})[direction] = metrics
    for metrics in results.values():
        add_rsum(metrics, relevance)
    return results


def global_map_all(images: torch.Tensor, texts: torch.Tensor, image_labels: torch.Tensor,
                   text_labels: torch.Tensor) -> dict[str, dict]:
    """Global mAP@all, R@K, P@K over the whole gallery, in blocks of queries (bounded memory)."""
    result = {}
    for direction, queries, gallery, query_labels, gallery_labels in (
            ("i2t", images, texts, image_labels, text_labels), ("t2i", texts, images, text_labels, image_labels)):
        step = max(1, BLOCK_ELEMENTS // gallery.size(0))
        result[direction] = summarize_queries([
            chunk_sums((queries[s:s + step] @ gallery.T).double().cpu().numpy(), query_labels[s:s + step].numpy(),
                       gallery_labels.numpy(), KS)
            for s in range(0, queries.size(0), step)])
    return result


def refuse_non_finite(dataset, kind: str, *embeddings: torch.Tensor) -> None:
    """NaN or inf embeddings would rank silently into a normal-looking table (as scoring.similarity_matrix)."""
    if not all(bool(torch.isfinite(values).all()) for values in embeddings):
        raise InputError(f"{dataset.folder}: the {kind} embeddings of the '{dataset.split}' split hold NaN or inf "
                         "values; feature values too large for float32?")


def fingerprint(net: Subnetwork, split: str) -> dict:
    """What the global embeddings of a split depend on: the checkpoint, the split's files, the batch."""
    folder = os.path.join(net.data_path, net.data_name)
    files = sorted(name for name in os.listdir(folder) if name.startswith(f"{split}_"))
    return {"checkpoint_sha256": sha256_file(net.path), "split": split, "batch_size": net.batch_size,
            "data": {name: sha256_file(os.path.join(folder, name)) for name in files}}


def read_saved_embeddings(folder: str, stamp: dict) -> dict[str, torch.Tensor] | None:
    """The embeddings saved in folder when they are whole and made from the same inputs; None (with one
    notice) when they are damaged or stale and must be made again. Another split or batch is refused: that
    folder is some other run's cache."""
    stamp_path = os.path.join(folder, "fingerprint.json")
    if not os.path.isfile(stamp_path):
        return None
    try:
        with open(stamp_path, encoding="utf-8") as f:
            stored = json.load(f)
        inputs, checksums = stored["inputs"], stored["sha256"]
        differ = [key for key in stamp if inputs.get(key) != stamp[key]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        print(f"notice: {stamp_path} is damaged or from an older version; encoding the embeddings again",
              file=sys.stderr)
        return None
    if "split" in differ or "batch_size" in differ:
        raise InputError(f"{folder}: the saved embeddings do not match this run ({', '.join(differ)} differ); "
                         "use another folder or delete this one")
    if differ:
        print(f"notice: the embeddings in {folder} were made from another {' and '.join(differ)}; encoding them "
              "again", file=sys.stderr)
        return None
    damaged = [name for name in EMBEDDING_FILES if not _file_matches(os.path.join(folder, f"{name}.npy"),
                                                                     checksums.get(name))]
    if damaged:
        print(f"notice: {os.path.join(folder, damaged[0] + '.npy')} is missing or damaged (its checksum differs); "
              "encoding the embeddings again", file=sys.stderr)
        return None
    return {name: torch.from_numpy(np.load(os.path.join(folder, f"{name}.npy"), allow_pickle=False))
            for name in EMBEDDING_FILES}


def _file_matches(path: str, checksum: object) -> bool:
    try:
        return isinstance(checksum, str) and sha256_file(path) == checksum
    except OSError:
        return False


def load_or_encode_global(net: Subnetwork, split: str, folder: str = "") -> dict[str, torch.Tensor]:
    """Global image / caption embeddings and labels of a split; with a folder, written there once and
    reused by later runs while whole and made from the same checkpoint and data (else made again)."""
    stamp = fingerprint(net, split) if folder else None
    saved = read_saved_embeddings(folder, stamp) if folder else None
    if saved is not None:
        return saved
    dataset = net.dataset(split)
    images, texts, _ = encode_split(net.model, dataset, net.batch_size, net.device)
    refuse_non_finite(dataset, "global", images, texts)
    embeddings = {"images": images.cpu(), "captions": texts.cpu(), "image_labels": dataset.labels,
                  "caption_labels": dataset.caption_labels}
    if folder:
        _write_embeddings(folder, embeddings, stamp)
    return embeddings


def npy_bytes(values: np.ndarray) -> bytes:
    """The .npy file of an array, in memory (to hash what is written)."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _write_embeddings(folder: str, embeddings: dict[str, torch.Tensor], stamp: dict) -> None:
    """Arrays first, each atomically, then the fingerprint with their checksums: a folder is reused only whole.
    Other files in the folder are left alone (search.py's indexes check the embeddings they were built from)."""
    checksums = {}
    for name, values in embeddings.items():
        payload = npy_bytes(values.numpy())
        atomic_write_bytes(os.path.join(folder, f"{name}.npy"), payload)
        checksums[name] = hashlib.sha256(payload).hexdigest()
    atomic_write_bytes(os.path.join(folder, "fingerprint.json"),
                       json.dumps({"inputs": stamp, "sha256": checksums}, indent=1).encode("utf-8"))
    print(f"wrote global embeddings to {folder}", file=sys.stderr)  # stdout may be --json


def local_scorer(net: Subnetwork, split: str) -> ShortlistScorer:
    """Local S_P of queries and their candidates from the split's local fragments, encoded once."""
    blocks, words, lengths = encode_split(net.model, net.dataset(split), net.batch_size, net.device)
    refuse_non_finite(net.dataset(split), "local", blocks, words)
    images, texts = net.model.gallery_fragments(blocks, words, lengths)
    del blocks, words  # the fragments hold trimmed copies

    @torch.no_grad()
    def score(queries: torch.Tensor, candidates: torch.Tensor, direction: str) -> torch.Tensor:
        return net.model.shortlist_similarity(images, texts, queries.to(net.device), candidates.to(net.device),
                                              direction).cpu()
    return score


def evaluate_shortlist(nets: list[Subnetwork], split: str, weight: float | None, k: int,
                       embeddings_folder: str = "", map_all: bool = False, relevance: str = "label"
                       ) -> dict[str, dict]:
    """Rows of evaluate.py's table for --shortlist K (the global subnetwork first) under a relevance protocol
    (metrics.protocol_labels: the same relevance blocks either way)."""
    global_net = nets[0]
    embeddings = load_or_encode_global(global_net, split, embeddings_folder)
    images, texts = embeddings["images"].to(global_net.device), embeddings["captions"].to(global_net.device)
    scorer = None
    if len(nets) == 2:
        scorer = local_scorer(nets[1], split)
    image_labels, caption_labels = (torch.from_numpy(labels) for labels in protocol_labels(
        relevance, embeddings["image_labels"].numpy(), embeddings["caption_labels"].numpy()))
    results = shortlist_results(images, texts, image_labels, caption_labels, k, scorer, weight, relevance)
    if map_all:
        results["global"]["mAP@all"] = global_map_all(images, texts, image_labels, caption_labels)
    return results
