"""Search a split with a typed caption or an image.

  python search.py --global_ckpt G [--local_ckpt L] --text "sky sun clouds" [--top 10] [--json]
  python search.py --global_ckpt G [--local_ckpt L] --image my_photo.jpg     # any image file
  python search.py --global_ckpt G --image_row 17                            # an image of the split by row

An image listed in {split}_images.txt is searched as its row; any other image file gets its CNN features
computed on the fly exactly as prepare_data.py made the split's (extraction/query.py). Results name their
classes when the data folder's summary.json records them.

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
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from data import cap_lengths, class_names, label_names, split_file
from evaluation import Subnetwork, SubnetworkConfig, add_subnetwork_arguments, check_subnetwork_arguments, open_split
from gallery import load_or_encode_global, rank
from metrics import protocol_labels, relevance as relevance_of
from runtime.errors import InputError, OutputError, report_errors
from runtime.files import atomic_write_bytes
from vocab import read_captions

INDEX_KINDS = ("flat", "hnsw")
HNSW_NEIGHBOURS = 32


@dataclass(frozen=True)
class SearchConfig(SubnetworkConfig):
    """One query and how it is searched (search.py's flags, whose defaults are these)."""

    text: str | None = None  # caption query: find images
    image_row: int | None = None  # image query by its row in the split: find captions
    image: str | None = None  # image query, any image file: find captions
    top: int = 10  # results to show
    shortlist: int = 100  # candidates taken from the index for re-ranking (at least top)
    index: str = "flat"  # one of INDEX_KINDS
    embeddings: str = ""  # cache folder; "": embeddings_<split> next to the global checkpoint
    json: bool = False  # results as JSON on stdout (notices on stderr)


def parse_args(argv: list[str] | None = None) -> SearchConfig:
    p = argparse.ArgumentParser(description="Search a split by caption text or by image.")
    add_subnetwork_arguments(p, "search")  # --global_ckpt is required: it builds the index
    d = SearchConfig()
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="caption query: find images")
    query.add_argument("--image_row", type=int, help="image query by its row in the split: find captions")
    query.add_argument("--image", help="image query, any image file (JPEG, PNG, TIFF, ...): find captions")
    p.add_argument("--top", type=int, default=d.top, help="results to show")
    p.add_argument("--shortlist", type=int, default=d.shortlist, help="candidates taken from the index for re-ranking")
    p.add_argument("--index", default=d.index, choices=INDEX_KINDS,
                   help="flat: exact inner product; hnsw: approximate (graph), for large splits")
    p.add_argument("--embeddings", default=d.embeddings, help="cache folder of embeddings and indexes "
                   "(default: embeddings_{split} next to the global checkpoint)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if not args.global_ckpt:
        p.error("--global_ckpt is required: the global subnetwork builds the index")
    if args.top < 1 or args.shortlist < 1:
        p.error("--top and --shortlist must be at least 1")
    check_subnetwork_arguments(p, args)
    args.shortlist = max(args.shortlist, args.top)
    return SearchConfig.from_flags(args)


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


def image_list_file(net: Subnetwork, split: str) -> str:
    """{split}_images.txt of the split's folder: one image path per line, row i = image i."""
    return os.path.join(net.data_path, net.data_name, f"{split}_images.txt")


def listed_row(path: str, net: Subnetwork, split: str) -> int | None:
    """Row of an image path in the split's image list; None when the split does not list it."""
    listing = image_list_file(net, split)
    if not os.path.isfile(listing):
        return None
    with open(listing, encoding="utf-8") as f:
        paths = [line.rstrip("\n") for line in f]
    wanted = os.path.abspath(path)
    return next((row for row, listed in enumerate(paths) if os.path.abspath(listed) == wanted), None)


def outside_image_features(path: str, nets: list[Subnetwork]) -> dict[str, torch.Tensor]:
    """CNN features of an image file for each subnetwork, made as its data folder's features were: the whole
    image (1, W) for the global one, its 3x3 blocks (1, 9, W) for the local one."""
    try:
        from extraction.query import cnn_recipe, image_views, open_backbone, query_image
    except ImportError as err:
        raise InputError(f"--image with a file outside the split needs the feature extraction packages ({err}): "
                         "pip install -r requirements-features.txt") from None
    image = query_image(path)
    recipes = {net.kind: cnn_recipe(os.path.join(net.data_path, net.data_name)) for net in nets}
    recipe = recipes["global"]
    if len(nets) == 2 and recipes["local"].made_as() != recipe.made_as():
        raise InputError(f"{recipes['local'].summary} and {recipe.summary} record different CNN features; "
                         "fusion needs both folders made by the same prepare_data.py run")
    for net in nets:
        if net.opt["cnn_dim"] != recipe.width:
            raise InputError(f"{recipe.summary}: the features are {recipe.width} wide ({recipe.backbone}), but "
                             f"{net.path} was trained on {net.opt['cnn_dim']} (--cnn_dim); give the checkpoint "
                             "trained on these features, or its own data folder")
    views = torch.from_numpy(image_views(image, open_backbone(recipe, nets[0].device), nets[0].device))
    return {"global": views[:1], "local": views[None, 1:]}


@torch.no_grad()
def encode_text(net: Subnetwork, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, L) and length of a typed caption, refused when it has no known word."""
    ids = cap_lengths("--text", [net.vocab.encode(text)], net.max_words)[0].tolist()
    if all(i == net.vocab.word2idx["<unk>"] for i in ids[1:-1]):
        raise InputError(f"--text {text!r}: no word of it is in the vocabulary")
    return torch.tensor([ids], device=net.device), torch.tensor([len(ids)])


@torch.no_grad()
def candidate_local_scores(net: Subnetwork, split: str, query: dict, candidates: torch.Tensor) -> torch.Tensor:
    """Local S_P of the query and each candidate, encoding only these candidates."""
    dataset, model = net.dataset(split), net.model
    if "text" in query:
        images = model.encode_primary_images(dataset.cnns[candidates].to(net.device))
        captions, lengths = query["text"]
        direction = "t2i"
    else:
        row = query.get("image_row")
        cnn = query["local_cnn"] if row is None else dataset.cnns[row:row + 1]
        images = model.encode_primary_images(cnn.to(net.device))
        listed = [dataset.captions[i] for i in candidates.tolist()]
        captions, lengths = pad_sequence(listed, batch_first=True).to(net.device), torch.tensor([len(c) for c in listed])
        direction = "i2t"
    images, texts = model.gallery_fragments(images, model.encode_primary_texts(captions, lengths), lengths)
    everyone = torch.arange(len(candidates), device=net.device)[None]
    return model.shortlist_similarity(images, texts, torch.zeros(1, dtype=torch.long, device=net.device), everyone,
                                      direction)[0].double().cpu()


def label_fields(label: torch.Tensor, names: list[str] | None) -> dict:
    """{"label": id (or multi-hot row)}, with "class": its name(s) when the data records them."""
    return {"label": label.tolist(), **({"class": label_names(label, names)} if names else {})}


def describe(net: Subnetwork, split: str, target: str, rows: torch.Tensor, labels: torch.Tensor,
             names: list[str] | None) -> list[dict]:
    """Row, label (and class name) and caption text or image path (when the split lists them) of each result."""
    folder = os.path.join(net.data_path, net.data_name)
    if target == "captions":
        texts = read_captions(split_file(folder, split, "caps"))
        return [{"row": r, **label_fields(labels[r], names), "caption": texts[r]} for r in rows.tolist()]
    paths = []
    if os.path.isfile(image_list_file(net, split)):
        with open(image_list_file(net, split), encoding="utf-8") as f:
            paths = f.read().splitlines()
    return [{"row": r, **label_fields(labels[r], names), **({"image": paths[r]} if paths else {})}
            for r in rows.tolist()]


@torch.no_grad()
def make_query(config: SearchConfig, nets: list[Subnetwork], split: str) -> tuple[dict, str]:
    """The query and what it searches (images or captions): token ids and their global "vector", an image row,
    or an image from outside the split as its global "vector" and its blocks' "local_cnn" features."""
    net = nets[0]
    if config.text is not None:
        tokens = encode_text(net, config.text)
        return {"text": tokens, "vector": net.model.encode_primary_texts(*tokens).cpu()[0]}, "images"
    row = config.image_row if config.image is None else listed_row(config.image, net, split)
    if row is not None:
        return {"image_row": row}, "captions"
    cnns = outside_image_features(config.image, nets)
    vector = net.model.encode_primary_images(cnns["global"].to(net.device)).cpu()[0]
    return {"vector": vector, "local_cnn": cnns["local"]}, "captions"


def query_vector(query: dict, embeddings: dict, split: str) -> torch.Tensor:
    """The query's global vector: its own, or its row's embedding."""
    if "vector" in query:
        return query["vector"]
    row, n_images = query["image_row"], embeddings["images"].size(0)
    if not 0 <= row < n_images:
        raise InputError(f"--image_row {row}: the {split} split has rows 0 to {n_images - 1}")
    return embeddings["images"][row]


def candidate_scores(weight: float | None, nets: list[Subnetwork], split: str, query: dict,
                     global_scores: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Global, local and fused ("score") scores of the candidates; "score" is global alone without a local net."""
    if len(nets) == 1:
        return {"global": global_scores, "score": global_scores}
    local = candidate_local_scores(nets[1], split, query, rows)
    fused = weight * global_scores + (1 - weight) * local
    return {"global": global_scores, "local": local, "score": fused}


def run_search(config: SearchConfig) -> dict:
    """The query's top results as a dict (what --json prints)."""
    opened = open_split(config, out=sys.stderr if config.json else sys.stdout)
    nets, split = opened.nets, opened.split
    query, target = make_query(config, nets, split)  # an unusable query image stops here, before any encoding
    for net in nets:  # read (and compared with the training data) even when the embeddings are cached
        net.dataset(split)
    global_net = nets[0]
    folder = config.embeddings or os.path.join(os.path.dirname(config.global_ckpt) or ".", f"embeddings_{split}")
    embeddings = load_or_encode_global(global_net, split, folder)
    vector = query_vector(query, embeddings, split)
    index = load_or_build_index(embeddings[target], os.path.join(folder, f"index_{config.index}_{target}.faiss"),
                                config.index)
    global_scores, rows = search_index(index, vector, config.shortlist)
    scores = candidate_scores(opened.weight, nets, split, query, global_scores, rows)
    ranked_rows = rank(scores["score"][None], rows[None])[1][0][:config.top]
    position = {row: i for i, row in enumerate(rows.tolist())}
    labels = embeddings["caption_labels" if target == "captions" else "image_labels"]
    names = class_names(os.path.join(global_net.data_path, global_net.data_name))
    results = [{"rank": number, **item, **{name: float(s[position[item["row"]]]) for name, s in scores.items()}}
               for number, item in enumerate(describe(global_net, split, target, ranked_rows, labels, names), 1)]
    shown = {"text": config.text} if config.text is not None else ({"image": config.image} if config.image else {})
    if "image_row" in query:  # an image of the split: its row, class and relevant captions are known
        row = query["image_row"]
        mark_relevant(results, row, embeddings, config.relevance)
        shown.update(image_row=row, **label_fields(embeddings["image_labels"][row], names))
    return {"query": shown, "split": split, "target": target, "index": config.index, "relevance": config.relevance,
            "fusion_weight": opened.weight, "results": results,
            "data": {net.kind: net.provenance[split] for net in nets}}


def mark_relevant(results: list[dict], image_row: int, embeddings: dict, relevance: str) -> None:
    """Each caption result's relevance to the query image under the protocol (metrics.protocol_labels)."""
    image_keys, caption_keys = protocol_labels(relevance, embeddings["image_labels"].numpy(),
                                               embeddings["caption_labels"].numpy())
    query_key = torch.from_numpy(image_keys[image_row:image_row + 1])
    rows = [r["row"] for r in results]
    flags = relevance_of(query_key, torch.from_numpy(caption_keys[rows]))[0].tolist()
    for result, flag in zip(results, flags):
        result["relevant"] = flag


def format_results(found: dict) -> str:
    """Plain-text listing: rank, score (and its global / local parts), row, label, caption or image."""
    head = f"{found['target']} of the {found['split']} split for {json.dumps(found['query'], ensure_ascii=False)}"
    if found["fusion_weight"] is not None:
        head += f" (score = {found['fusion_weight']:.2f} global + {1 - found['fusion_weight']:.2f} local)"
    lines = [head]
    for r in found["results"]:
        parts = f" (global {r['global']:.4f}, local {r['local']:.4f})" if "local" in r else ""
        what = r.get("caption") or r.get("image") or ""
        label = f"class {', '.join(np.atleast_1d(r['class']))}" if "class" in r else f"label {r['label']}"
        mark = {True: "  relevant", False: "  not relevant"}.get(r.get("relevant"), "")
        lines.append(f"{r['rank']:3d}. {r['score']:.4f}{parts}  row {r['row']}  {label}{mark}  {what}".rstrip())
    return "\n".join(lines)


@report_errors
def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    found = run_search(config)
    print(json.dumps(found, indent=2, ensure_ascii=False) if config.json else format_results(found))
    return found


if __name__ == "__main__":
    main()
