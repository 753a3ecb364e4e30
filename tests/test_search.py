"""search.py on tiny generated data: FAISS results against brute force, local re-ranking, JSON, image paths."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import search
from evaluate import Subnetwork, parse_args as evaluate_args
from gallery import load_or_encode_global

def run(capsys, *argv: str) -> tuple[dict, str]:
    """search.main in this process: the returned results and what it printed."""
    found = search.main(["--device", "cpu", *argv])
    return found, capsys.readouterr().out


def error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        search.main(["--device", "cpu", *argv])
    assert stop.value.code == 2
    return capsys.readouterr().err


def brute_force(query: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = (gallery.double() @ query.double()).numpy()
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


@pytest.fixture
def global_args(untrained, tiny_data, tmp_path):
    return ["--global_ckpt", untrained["global"], "--data_path", tiny_data["coarse"],
            "--embeddings", str(tmp_path / "emb")]


def test_flat_index_equals_brute_force_top_k(global_args, tmp_path, capsys):
    found, out = run(capsys, *global_args, "--image_row", "3", "--top", "7", "--json")
    assert json.loads(out) == found  # --json prints exactly the results
    emb = {name: torch.from_numpy(np.load(tmp_path / "emb" / f"{name}.npy")) for name in ("images", "captions")}
    rows, scores = brute_force(emb["images"][3], emb["captions"], 7)
    assert [r["row"] for r in found["results"]] == rows.tolist()
    assert np.allclose([r["score"] for r in found["results"]], scores, atol=1e-5)
    assert found["target"] == "captions" and all(r["caption"] for r in found["results"])
    assert os.path.isfile(tmp_path / "emb" / "index_flat_captions.faiss")


def test_index_searches_match_brute_force_on_random_vectors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    vectors, query = torch.randn(300, 16, generator=gen), torch.randn(16, generator=gen)
    rows, scores = brute_force(query, vectors, 12)
    flat = search.load_or_build_index(vectors, str(tmp_path / "flat.faiss"), "flat")
    got_scores, got_rows = search.search_index(flat, query, 12)
    assert got_rows.tolist() == rows.tolist() and np.allclose(got_scores.numpy(), scores, atol=1e-5)
    hnsw = search.load_or_build_index(vectors, str(tmp_path / "hnsw.faiss"), "hnsw")
    approx_rows = search.search_index(hnsw, query, 12)[1]
    assert len(set(approx_rows.tolist()) & set(rows.tolist())) >= 10  # approximate, but close on 300 items
    again = search.load_or_build_index(vectors, str(tmp_path / "flat.faiss"), "flat")  # read back from disk
    assert search.search_index(again, query, 12)[1].tolist() == rows.tolist()


def test_text_query_with_local_reranking_is_fused(untrained, tiny_data, tmp_path, capsys):
    caption = open(os.path.join(tiny_data["coarse"], tiny_data["name"], "test_caps.txt")).readline().strip()
    found, out = run(capsys, "--global_ckpt", untrained["global"], "--local_ckpt", untrained["local"],
                     "--global_data_path", tiny_data["coarse"], "--local_data_path", tiny_data["fine"],
                     "--embeddings", str(tmp_path / "emb"), "--text", caption, "--top", "5",
                     "--shortlist", "20", "--fusion_weight", "0.3")
    results = found["results"]
    assert found["target"] == "images" and len(results) == 5 and out.count("row ") == 5
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    for r in results:
        assert r["score"] == pytest.approx(0.3 * r["global"] + 0.7 * r["local"])
    # local scores equal the full local similarity of the typed caption with each image
    args = evaluate_args(["--local_ckpt", untrained["local"], "--data_path", tiny_data["fine"], "--device", "cpu"])
    local = Subnetwork("local", untrained["local"], tiny_data["fine"], args, torch.device("cpu"))
    ids = torch.tensor([local.vocab.encode(caption)])
    with torch.no_grad():
        words = local.model.encode_primary_texts(ids, torch.tensor([ids.size(1)]))
        blocks = local.model.encode_primary_images(local.dataset("test").cnns)
        full = local.model.primary_similarity(blocks, words, torch.tensor([ids.size(1)]))[:, 0]
    assert np.allclose([r["local"] for r in results], full[[r["row"] for r in results]].numpy(), atol=1e-5)


def test_image_by_path(global_args, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_data["coarse"], tiny_data["name"]), data / tiny_data["name"])
    paths = [f"photos/img_{i:03d}.jpg" for i in range(20)]
    (data / tiny_data["name"] / "test_images.txt").write_text("\n".join(paths) + "\n")
    args = ["--global_ckpt", global_args[1], "--data_path", str(data), "--embeddings", str(tmp_path / "emb2")]
    by_path, _ = run(capsys, *args, "--image", "photos/img_004.jpg", "--json")
    by_row, _ = run(capsys, *args, "--image_row", "4", "--json")
    assert by_path["results"] == by_row["results"] and by_path["query"]["image_row"] == 4
    text, _ = run(capsys, *args, "--text", open(data / tiny_data["name"] / "test_caps.txt").readline())
    assert text["results"][0]["image"] in paths
    assert "not listed in" in error(capsys, *args, "--image", "photos/other.jpg")


def test_clear_errors(global_args, capsys, monkeypatch):
    assert "rows 0 to 19" in error(capsys, *global_args, "--image_row", "20")
    assert "test_images.txt: not found" in error(capsys, *global_args, "--image", "a.jpg")
    assert "no word of it is in the vocabulary" in error(capsys, *global_args, "--text", "qqq zzz")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    assert "search.py needs FAISS: pip install faiss-cpu" in error(capsys, *global_args, "--image_row", "1")


def test_cache_made_for_another_split_is_refused(global_args, capsys):
    run(capsys, *global_args, "--image_row", "0")
    assert "saved embeddings do not match this run" in error(capsys, *global_args, "--split", "dev",
                                                             "--image_row", "0")
