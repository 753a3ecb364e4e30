"""search.py on tiny generated data: FAISS results against brute force, local re-ranking, JSON, image paths,
images from outside the split (features made on the fly as prepare_data.py made the split's), class names."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
import search
from evaluate import parse_args as evaluate_args
from evaluation import Subnetwork
from extraction.query import cnn_recipe, image_views, open_backbone, query_image
from gallery import load_or_encode_global
from tests._images import CATEGORIES, make_caption_json
from tests.conftest import save_untrained, with_vocab

NAME = "toy_precomp"
EXTRACTION = ["--cnn_backbone", "alexnet", "--cnn_weights", "random", "--seed", "5", "--codebook_size", "8",
              "--sift_step", "4", "--sift_size", "8", "--batch_size", "4", "--device", "cpu"]

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
    assert "photos/other.jpg: not found" in error(capsys, *args, "--image", "photos/other.jpg")


def test_clear_errors(global_args, capsys, monkeypatch):
    assert "rows 0 to 19" in error(capsys, *global_args, "--image_row", "20")
    assert "a.jpg: not found; --image takes an image file" in error(capsys, *global_args, "--image", "a.jpg")
    assert "no word of it is in the vocabulary" in error(capsys, *global_args, "--text", "qqq zzz")
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    assert "search.py needs FAISS: pip install faiss-cpu" in error(capsys, *global_args, "--image_row", "1")


def test_cache_made_for_another_split_is_refused(global_args, capsys):
    run(capsys, *global_args, "--image_row", "0")
    assert "saved embeddings do not match this run" in error(capsys, *global_args, "--split", "dev",
                                                             "--image_row", "0")


# ---------------------------------------------------------------- images from outside the split

@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> dict:
    """Generated images (3 captions each, classes from class lists) made into features by prepare_data.py with
    a random-weight AlexNet, their vocabulary and untrained checkpoints of these feature widths."""
    root = tmp_path_factory.mktemp("extracted")
    raw = make_caption_json(root / "raw", {"train": 6, "val": 3, "test": 6})
    prepare_data.main(["--caption_json", str(raw["json"]), "--images", str(raw["images"]), "--class_lists",
                       str(raw["classes"]), "--out_path", str(root), "--data_name", NAME, *EXTRACTION])
    data = with_vocab(str(root), NAME)
    data["ckpt"] = save_untrained(data, root / "ckpt", "--cnn_dim", "4096", "--bovw_dim", "8")
    data["listed"] = (root / "coarse-grained-data" / NAME / "test_images.txt").read_text().splitlines()
    return data


def both_args(extracted: dict, embeddings) -> list[str]:
    return ["--global_ckpt", extracted["ckpt"]["global"], "--local_ckpt", extracted["ckpt"]["local"],
            "--global_data_path", extracted["coarse"], "--local_data_path", extracted["fine"],
            "--embeddings", str(embeddings)]


def outside_copy(extracted: dict, row: int, folder) -> str:
    """The picture of a test row saved again as a TIFF elsewhere: the same pixels, not listed in the split."""
    path = str(folder / f"my_photo_{row}.tif")
    Image.open(extracted["listed"][row]).save(path)
    return path


def test_outside_image_gets_the_features_of_its_row(extracted, tmp_path):
    device = torch.device("cpu")
    recipe = cnn_recipe(os.path.join(extracted["coarse"], NAME))
    model = open_backbone(recipe, device)
    for row in (1, 4):
        views = image_views(query_image(outside_copy(extracted, row, tmp_path)), model, device)
        coarse = np.load(os.path.join(extracted["coarse"], NAME, "test_cnns.npy"))[row]
        fine = np.load(os.path.join(extracted["fine"], NAME, "test_cnns.npy"))[row]
        assert views.shape == (10, 4096) and fine.shape == (9, 4096) and coarse.std() > 0
        assert np.abs(views[0] - coarse).max() < 1e-5 and np.abs(views[1:] - fine).max() < 1e-5
        other = np.load(os.path.join(extracted["coarse"], NAME, "test_cnns.npy"))[row + 1]
        assert np.abs(views[0] - other).max() > 1e-3  # the tolerance tells images apart


def test_outside_image_ranks_the_captions_as_its_row(extracted, tmp_path, capsys):
    args = [*both_args(extracted, tmp_path / "emb"), "--top", "18", "--shortlist", "18", "--json"]
    photo = outside_copy(extracted, 4, tmp_path)
    by_file, _ = run(capsys, *args, "--image", photo)
    by_row, _ = run(capsys, *args, "--image_row", "4")
    assert by_file["query"] == {"image": photo} and by_row["query"]["image_row"] == 4
    # the same ranking; captions that encode alike (this split repeats each one, numbers are unknown words) tie
    # and may swap within float32 noise, as local scores are summed over caption groups of similar length
    assert sorted(r["row"] for r in by_file["results"]) == sorted(r["row"] for r in by_row["results"])
    score_of_row = {r["row"]: r["score"] for r in by_row["results"]}
    for got, want in zip(by_file["results"], by_row["results"]):
        assert got["row"] == want["row"] or score_of_row[got["row"]] == pytest.approx(want["score"], abs=1e-7)
    assert len({round(r["score"], 6) for r in by_row["results"]}) > 5  # a real ranking, not one tie
    for got, want in zip(by_file["results"], by_row["results"]):
        for name in ("global", "local", "score"):
            assert got[name] == pytest.approx(want[name], abs=1e-5)
    alone = ["--global_ckpt", extracted["ckpt"]["global"], "--data_path", extracted["coarse"], "--embeddings",
             str(tmp_path / "emb_global"), "--top", "18", "--json"]
    global_by_file, global_by_row = (run(capsys, *alone, *query)[0]["results"]
                                     for query in (("--image", photo), ("--image_row", "4")))
    assert [r["row"] for r in global_by_file] == [r["row"] for r in global_by_row]
    assert np.allclose([r["score"] for r in global_by_file], [r["score"] for r in global_by_row], atol=1e-5)
    listed, _ = run(capsys, *args, "--image", extracted["listed"][4])  # an image of the split: its row
    assert listed["query"]["image_row"] == 4 and listed["results"] == by_row["results"]


def test_results_name_their_classes(extracted, tmp_path, capsys):
    found, _ = run(capsys, *both_args(extracted, tmp_path / "emb"), "--image_row", "2", "--top", "4", "--json")
    names = list(CATEGORIES)  # the class-list file names, sorted
    labels = np.load(os.path.join(extracted["coarse"], NAME, "test_labels.npy"))
    assert found["query"]["class"] == names[labels[2]]
    assert all(r["class"] == names[labels[r["row"] // 3]] for r in found["results"])
    found, out = run(capsys, *both_args(extracted, tmp_path / "emb"), "--text", "blue square box", "--top", "3")
    assert all(f"class {r['class']}" in out for r in found["results"]) and "label " not in out


def test_folders_without_class_names_print_ids(global_args, capsys):
    found, out = run(capsys, *global_args, "--image_row", "1", "--top", "3")
    assert all("class" not in r for r in found["results"]) and out.count("  label ") == 3


def one_line_error(capsys, *argv) -> str:
    message = error(capsys, *argv).strip()
    assert "\n" not in message and "Traceback" not in message
    return message


def test_what_cannot_work_is_one_line(extracted, untrained, tiny_data, global_args, tmp_path, capsys, monkeypatch):
    args = both_args(extracted, tmp_path / "emb")
    (tmp_path / "notes.txt").write_text("not a picture")
    assert "notes.txt: unreadable" in one_line_error(capsys, *args, "--image", str(tmp_path / "notes.txt"))
    assert "gone.jpg: not found" in one_line_error(capsys, *args, "--image", str(tmp_path / "gone.jpg"))
    photo = outside_copy(extracted, 0, tmp_path)
    assert "summary.json: not found or unreadable" in one_line_error(capsys, *global_args, "--image", photo)
    wide = save_untrained(extracted, tmp_path / "wide", "--cnn_dim", "1280", "--bovw_dim", "8")["global"]
    message = one_line_error(capsys, "--global_ckpt", wide, "--data_path", extracted["coarse"], "--image", photo,
                             "--embeddings", str(tmp_path / "emb_wide"))
    assert "the features are 4096 wide (alexnet), but" in message and "was trained on 1280 (--cnn_dim)" in message
    message = one_line_error(capsys, "--global_ckpt", wide, "--data_path", extracted["coarse"], "--image_row", "0",
                             "--embeddings", str(tmp_path / "emb_wide"))
    assert "test_cnns.npy: feature width 4096 differs from the 1280 (--cnn_dim) that" in message
    # features made with the ImageNet AlexNet, whose weight file this machine does not have
    data = tmp_path / "alexnet"
    shutil.copytree(os.path.join(extracted["coarse"], NAME), data / NAME)
    summary = json.loads((data / NAME / "summary.json").read_text())
    summary["cnn"]["weights"] = "imagenet"
    (data / NAME / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    message = one_line_error(capsys, "--global_ckpt", extracted["ckpt"]["global"], "--data_path", str(data),
                             "--image", photo, "--embeddings", str(tmp_path / "emb_alexnet"))
    assert "ImageNet AlexNet weights are not on this machine" in message and "alexnet-owt-7be5be79.pth" in message
