"""Search a split with a typed caption or one of its images (issue 10, item 5).

  python search.py --global_ckpt G [--local_ckpt L] --text "sky sun clouds" [--top 10] [--json]
  python search.py --global_ckpt G --image_row 17            # or --image PATH listed in {split}_images.txt

A FAISS index of the split's global image and caption embeddings (exact inner product by default,
`--index hnsw` approximate) finds each query's `--shortlist` nearest items; with a local checkpoint they
are re-ranked by the fused score w * global + (1 - w) * local. Embeddings and indexes are built once and
cached (`--embeddings DIR`, default next to the global checkpoint); a cache made from another checkpoint,
split or data is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from data import cap_lengths, split_file
from errors import InputError, OutputError, report_errors
from files import atomic_write_bytes
from evaluate import add_subnetwork_arguments, check_same_items, check_subnetwork_arguments, open_subnetworks, pick_split
from gallery import load_or_encode_global, rank
from options import resolve_device
from vocab import read_captions

INDEX_KINDS = ("flat", "hnsw")
HNSW_NEIGHBOURS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Search a split by caption text or by image.")
    add_subnetwork_arguments(p, "search")  # --global_ckpt is required: it builds the index
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="caption query: find images")
    query.add_argument("--image_row", type=int, help="image query by its row in the split: find captions")
    query.add_argument("--image", help="image query by its path in {split}_images.txt: find captions")
    p.add_argument("--top", type=int, default=10, help="results to show")
    p.add_argument("--shortlist", type=int, default=100, help="candidates taken from the index for re-ranking")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS,
                   help="flat: exact inner product; hnsw: approximate (graph), for large splits")
    p.add_argument("--embeddings", default="", help="cache folder of embeddings and indexes "
                   "(default: embeddings_{split} next to the global checkpoint)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if not args.global_ckpt:
        p.error("--global_ckpt is required: the global subnetwork builds the index")
    if args.top < 1 or args.shortlist < 1:
        p.error("--top and --shortlist must be at least 1")
    check_subnetwork_arguments(p, args)
    args.shortlist = max(args.shortlist, args.top)
    return args


def import_faiss():
    """The faiss module, or one clear line saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise InputError("search.py needs FAISS: pip install faiss-cpu (or pip install -r requirements-search.txt)") \
            from None
    return faiss


def load_or_build_index(vectors: torch.Tensor, path: str, kind: str):
    """Inner-product index of the rows of vectors: read from path when it is whole (its checksum) and was built
    from these very vectors, else built and saved atomically with one notice; a failed save is a notice too."""
    faiss = import_faiss()
    data = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
    built_from = hashlib.sha256(data.tobytes()).hexdigest()
    index = read_index(faiss, path, built_from)
    if index is not None:
        return index
    if kind == "flat":
        index = faiss.IndexFlatIP(data.shape[1])
    else:
        index = faiss.IndexHNSWFlat(data.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.add(data)
    payload = faiss.serialize_index(index).tobytes()
    try:
        atomic_write_bytes(path, payload)
        atomic_write_bytes(path + ".json", json.dumps({"sha256": hashlib.sha256(payload).hexdigest(),
                                                       "built_from_sha256": built_from}).encode("utf-8"))
    except OutputError as err:  # a cache: the search goes on without it
        print(f"notice: the index was not cached ({err})", file=sys.stderr)
    return index


def read_index(faiss, path: str, built_from: str):
    """The index saved at path, or None (with one notice when a saved one is damaged or stale)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path + ".json", encoding="utf-8") as f:
            stamp = json.load(f)
        with open(path, "rb") as f:
            payload = f.read()
        if stamp["built_from_sha256"] != built_from:
            print(f"notice: {path} was built from other embeddings; building it again", file=sys.stderr)
            return None
        if stamp["sha256"] != hashlib.sha256(payload).hexdigest():
            raise ValueError("checksum differs")
        return faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        print(f"notice: {path} is damaged or incomplete ({str(err).splitlines()[0][:80] if str(err) else err!r}); "
              "building it again", file=sys.stderr)
        return None


def search_index(index, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and rows of the k best items for one query vector (fewer when the index is smaller)."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(64, k)  # the candidate list must be at least k long
    k = min(k, index.ntotal)
    scores, rows = index.search(np.ascontiguousarray(query.reshape(1, -1).numpy(), dtype=np.float32), k)
    kept = rows[0] >= 0  # faiss pads with -1 when an approximate index finds fewer
    return torch.from_numpy(scores[0][kept]).double(), torch.from_numpy(rows[0][kept]).long()


def image_list_file(net, split: str) -> str:
    """{split}_images.txt of the split's folder: one image path per line, row i = image i."""
    return os.path.join(net.data_path, net.data_name, f"{split}_images.txt")


def image_row_of(path: str, net, split: str) -> int:
    """Row of an image path in the split's image list."""
    listing = image_list_file(net, split)
    if not os.path.isfile(listing):
        raise InputError(f"{listing}: not found; --image needs the split's image list (or use --image_row)")
    with open(listing, encoding="utf-8") as f:
        paths = [line.rstrip("\n") for line in f]
    wanted = os.path.normpath(path)
    for row, listed in enumerate(paths):
        if os.path.normpath(listed) == wanted:
            return row
    raise InputError(f"{path}: not listed in {listing}; search works on the split's own images")


@torch.no_grad()
def encode_text(net, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, L) and length of a typed caption, refused when it has no known word."""
    ids = cap_lengths("--text", [net.vocab.encode(text)], net.max_words)[0].tolist()
    if all(i == net.vocab.word2idx["<unk>"] for i in ids[1:-1]):
        raise InputError(f"--text {text!r}: no word of it is in the vocabulary")
    return torch.tensor([ids], device=net.device), torch.tensor([len(ids)])


@torch.no_grad()
def local_scores(net, split: str, query: dict, candidates: torch.Tensor) -> torch.Tensor:
    """Local S_P of the query and each candidate, encoding only these candidates."""
    dataset, model = net.dataset(split), net.model
    if "text" in query:
        images = model.encode_primary_images(dataset.cnns[candidates].to(net.device))
        captions, lengths = query["text"]
        direction = "t2i"
    else:
        images = model.encode_primary_images(dataset.cnns[query["image_row"]:query["image_row"] + 1].to(net.device))
        listed = [dataset.captions[i] for i in candidates.tolist()]
        captions, lengths = pad_sequence(listed, batch_first=True).to(net.device), torch.tensor([len(c) for c in listed])
        direction = "i2t"
    images, texts = model.gallery_fragments(images, model.encode_primary_texts(captions, lengths), lengths)
    everyone = torch.arange(len(candidates), device=net.device)[None]
    return model.shortlist_similarity(images, texts, torch.zeros(1, dtype=torch.long, device=net.device), everyone,
                                      direction)[0].double().cpu()


def describe(net, split: str, target: str, rows: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Row, label and caption text or image path (when the split lists them) of each result."""
    if target == "captions":
        texts = read_captions(split_file(os.path.join(net.data_path, net.data_name), split, "caps"))
        return [{"row": r, "label": labels[r].tolist(), "caption": texts[r]} for r in rows.tolist()]
    paths = []
    if os.path.isfile(image_list_file(net, split)):
        with open(image_list_file(net, split), encoding="utf-8") as f:
            paths = f.read().splitlines()
    return [{"row": r, "label": labels[r].tolist(), **({"image": paths[r]} if paths else {})}
            for r in rows.tolist()]


@torch.no_grad()
def make_query(args: argparse.Namespace, net, split: str, embeddings: dict) -> tuple[dict, torch.Tensor, str]:
    """The query (token ids or image row), its global vector and what it searches: images or captions."""
    if args.text is not None:
        query = {"text": encode_text(net, args.text)}
        return query, net.model.encode_primary_texts(*query["text"]).cpu()[0], "images"
    row = args.image_row if args.image is None else image_row_of(args.image, net, split)
    n_images = embeddings["images"].size(0)
    if not 0 <= row < n_images:
        raise InputError(f"--image_row {row}: the {split} split has rows 0 to {n_images - 1}")
    return {"image_row": row}, embeddings["images"][row], "captions"


def candidate_scores(args: argparse.Namespace, nets: list, split: str, query: dict, global_scores: torch.Tensor,
                     rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Global, local and fused ("score") scores of the candidates; "score" is global alone without a local net."""
    if len(nets) == 1:
        return {"global": global_scores, "score": global_scores}
    local = local_scores(nets[1], split, query, rows)
    fused = args.fusion_weight * global_scores + (1 - args.fusion_weight) * local
    return {"global": global_scores, "local": local, "score": fused}


def run_search(args: argparse.Namespace) -> dict:
    """The query's top results as a dict (what --json prints)."""
    nets = open_subnetworks(args, resolve_device(args.device))
    split = pick_split(nets, args.split)
    if len(nets) == 2:
        check_same_items(nets, split)
    for net in nets:  # read (and compared with the training data) even when the embeddings are cached
        net.dataset(split)
    global_net = nets[0]
    folder = args.embeddings or os.path.join(os.path.dirname(args.global_ckpt) or ".", f"embeddings_{split}")
    embeddings = load_or_encode_global(global_net, split, args.batch_size or global_net.opt["batch_size"], folder)
    query, vector, target = make_query(args, global_net, split, embeddings)
    index = load_or_build_index(embeddings[target], os.path.join(folder, f"index_{args.index}_{target}.faiss"),
                                args.index)
    global_scores, rows = search_index(index, vector, args.shortlist)
    scores = candidate_scores(args, nets, split, query, global_scores, rows)
    ranked_rows = rank(scores["score"][None], rows[None])[1][0][:args.top]
    position = {row: i for i, row in enumerate(rows.tolist())}
    labels = embeddings["caption_labels" if target == "captions" else "image_labels"]
    results = [{"rank": number, **item, **{name: float(s[position[item["row"]]]) for name, s in scores.items()}}
               for number, item in enumerate(describe(global_net, split, target, ranked_rows, labels), 1)]
    shown = {"text": args.text} if args.text is not None else \
        {"image_row": query["image_row"], **({"image": args.image} if args.image else {})}
    return {"query": shown, "split": split, "target": target, "index": args.index,
            "fusion_weight": args.fusion_weight if len(nets) == 2 else None, "results": results,
            "data": {net.kind: net.provenance[split] for net in nets}}


def format_results(found: dict) -> str:
    """Plain-text listing: rank, score (and its global / local parts), row, label, caption or image."""
    head = f"{found['target']} of the {found['split']} split for {json.dumps(found['query'], ensure_ascii=False)}"
    if found["fusion_weight"] is not None:
        head += f" (score = {found['fusion_weight']:.2f} global + {1 - found['fusion_weight']:.2f} local)"
    lines = [head]
    for r in found["results"]:
        parts = f" (global {r['global']:.4f}, local {r['local']:.4f})" if "local" in r else ""
        what = r.get("caption") or r.get("image") or ""
        lines.append(f"{r['rank']:3d}. {r['score']:.4f}{parts}  row {r['row']}  label {r['label']}  {what}".rstrip())
    return "\n".join(lines)


@report_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    found = run_search(args)
    print(json.dumps(found, indent=2, ensure_ascii=False) if args.json else format_results(found))
    return found


if __name__ == "__main__":
    main()
