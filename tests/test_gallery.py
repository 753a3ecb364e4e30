"""Large-gallery evaluation (gallery.py, evaluate.py --shortlist) against full matrices and looped references."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import gallery
from metrics import retrieval_metrics
from model_local import ATTENTION_NORMS, Fragments, LocalModel, paired_attention, shortlist_attention
from synthetic import generate
from tests.conftest import TINY, save_untrained
from tests.references import shortlist_metrics_reference
from vocab import build_vocab, save_vocab, vocab_file

TOL = 1e-12
LOCAL_OPT = {"cnn_dim": 6, "bovw_dim": 4, "embed_size": 8, "word_dim": 5, "num_layers": 1, "bi_gru": True,
             "raw_feature_norm": "clipped_l2norm", "lambda_softmax": 9.0, "beta_1": 0.4, "beta_2": 0.4}


def integer_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """Small integers in float64: exact inner products, so many exact ties."""
    return torch.randint(-2, 3, (n, dim), generator=torch.Generator().manual_seed(seed)).double()


def local_case(n_images: int, n_captions: int, seed: int):
    """Unit block embeddings (n, 9, d), padded unit word vectors and lengths, float64."""
    gen = torch.Generator().manual_seed(seed)
    d = LOCAL_OPT["embed_size"]
    blocks = F.normalize(torch.randn(n_images, 9, d, generator=gen, dtype=torch.float64), dim=-1)
    lengths = torch.randint(1, 6, (n_captions,), generator=gen)
    words = F.normalize(torch.randn(n_captions, 5, d, generator=gen, dtype=torch.float64), dim=-1)
    words[torch.arange(5)[None] >= lengths[:, None]] = 0
    return blocks, words, lengths


def local_scorer(model: LocalModel, blocks, words, lengths):
    images, texts = model.gallery_fragments(blocks, words, lengths)
    return lambda queries, candidates, direction: model.shortlist_similarity(images, texts, queries, candidates,
                                                                             direction)


@pytest.mark.parametrize("integer", [True, False])  # many ties at the k-th value / none
def test_keep_top_and_rank_equal_a_stable_sort(integer):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (30, 50), generator=gen).double() if integer else torch.randn(30, 50, generator=gen)
    items = torch.arange(50)[None]
    kept_scores, kept_items = gallery.rank(*gallery.keep_top(scores, items, 7))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(kept_items, order)
    assert torch.equal(kept_scores, scores.gather(1, order))


@pytest.mark.parametrize("n_images,n_captions,k", [(23, 23, 5), (12, 36, 10), (9, 18, 18)])
def test_global_shortlists_equal_the_full_ranking(monkeypatch, n_images, n_captions, k):
    monkeypatch.setattr(gallery, "BLOCK_ELEMENTS", 2 * n_captions)  # two image rows per block: running top-k
    images, texts = integer_embeddings(n_images, 4, 1), integer_embeddings(n_captions, 4, 2)
    i2t, t2i = gallery.global_shortlists(images, texts, k)
    for shortlist, sims in ((i2t, images @ texts.T), (t2i, texts @ images.T)):
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(shortlist.items, order)
        assert torch.equal(shortlist.scores, sims.gather(1, order))


@pytest.mark.parametrize("norm", ATTENTION_NORMS)
def test_shortlist_attention_equals_the_full_local_matrix(norm):
    blocks, words, lengths = local_case(6, 8, 3)
    block_lengths = torch.full((6,), 9)
    full = paired_attention(blocks, block_lengths, words, lengths, norm)
    rows, cols = Fragments.of(blocks, block_lengths), Fragments.of(words, lengths)
    candidates = torch.tensor([[7, 0, 1], [1, 1, 4]])  # a repeated candidate too
    queries = torch.tensor([5, 2])
    i2t = shortlist_attention(rows, cols, queries, candidates, True, norm)
    assert (i2t - full[queries[:, None], candidates]).abs().max() < 1e-12
    candidates = torch.tensor([[0, 5], [3, 0], [2, 2]])
    queries = torch.tensor([7, 0, 4])
    t2i = shortlist_attention(rows, cols, queries, candidates, False, norm)
    assert (t2i - full.T[queries[:, None], candidates]).abs().max() < 1e-12


def test_local_scores_in_chunks_follow_the_direction(monkeypatch):
    monkeypatch.setattr(gallery, "PAIRS_PER_CALL", 3)
    torch.manual_seed(0)
    model = LocalModel(LOCAL_OPT, 20).double()
    blocks, words, lengths = local_case(4, 6, 5)
    full = model.primary_similarity(blocks, words, lengths)
    scorer = local_scorer(model, blocks, words, lengths)
    items = torch.tensor([[5, 0], [2, 3], [1, 1], [4, 0]])
    i2t = gallery.shortlist_local_scores(gallery.Shortlist(items.double(), items), "i2t", scorer)
    assert (i2t - full.gather(1, items)).abs().max() < 1e-12
    images = torch.tensor([[3, 0, 1], [2, 2, 0], [1, 0, 3], [0, 1, 2], [3, 3, 1], [2, 0, 1]])
    t2i = gallery.shortlist_local_scores(gallery.Shortlist(images.double(), images), "t2i", scorer)
    assert (t2i - full.T.gather(1, images)).abs().max() < 1e-12


def _labels(n_images: int, per_image: int, seed: int, multi_hot: bool):
    rng = np.random.default_rng(seed)
    if multi_hot:
        image_labels = (rng.random((n_images, 4)) < 0.3).astype(np.int64)
        image_labels[0] = 0  # no label: a query with no relevant item
    else:
        image_labels = rng.integers(0, 4, n_images)
        image_labels[0] = 9  # its captions get label 8: queries with no relevant item both ways
    caption_labels = np.repeat(image_labels, per_image, axis=0)
    if not multi_hot:
        caption_labels[:per_image] = 8
    return torch.from_numpy(image_labels), torch.from_numpy(caption_labels)


@pytest.mark.parametrize("per_image,multi_hot", [(1, False), (3, False), (2, True)])
def test_shortlist_of_the_whole_gallery_equals_the_full_evaluation(monkeypatch, per_image, multi_hot):
    monkeypatch.setattr(gallery, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(gallery, "PAIRS_PER_CALL", 17)
    n_images = 14
    n_captions = per_image * n_images
    torch.manual_seed(1)
    model = LocalModel(LOCAL_OPT, 20).double()
    blocks, words, lengths = local_case(n_images, n_captions, 4)
    images, texts = integer_embeddings(n_images, 3, 5), integer_embeddings(n_captions, 3, 6)
    image_labels, text_labels = _labels(n_images, per_image, 7, multi_hot)
    weight = 0.3
    got = gallery.shortlist_results(images, texts, image_labels, text_labels, n_captions,
                                    local_scorer(model, blocks, words, lengths), weight)
    global_sims = (images @ texts.T).numpy()
    local_sims = model.primary_similarity(blocks, words, lengths).numpy()
    full = {"global": global_sims, "local": local_sims, "fused": weight * global_sims + (1 - weight) * local_sims}
    assert set(got) == set(full)
    for name, sims in full.items():
        want = retrieval_metrics(sims, image_labels.numpy(), text_labels.numpy())
        for direction in ("i2t", "t2i"):
            assert got[name][direction].keys() == want[direction].keys()
            for key, value in want[direction].items():
                assert abs(got[name][direction][key] - value) <= TOL, (name, direction, key)
        assert got[name]["i2t"]["no_relevant"] == want["i2t"]["no_relevant"]
    # the left-out queries are really exercised
    assert got["global"]["i2t"]["no_relevant"] >= 1 and got["global"]["t2i"]["no_relevant"] >= 1
    assert got["global"]["rsum"] != got["local"]["rsum"]


@pytest.mark.parametrize("multi_hot", [False, True])
def test_map_at_k_matches_the_looped_reference(multi_hot):
    torch.manual_seed(2)
    model = LocalModel(LOCAL_OPT, 20).double()
    n_images, per_image, k = 16, 2, 10
    blocks, words, lengths = local_case(n_images, per_image * n_images, 8)
    images, texts = integer_embeddings(n_images, 3, 9), integer_embeddings(per_image * n_images, 3, 10)
    image_labels, text_labels = _labels(n_images, per_image, 11, multi_hot)
    got = gallery.shortlist_results(images, texts, image_labels, text_labels, k,
                                    local_scorer(model, blocks, words, lengths), 0.6)
    global_sims = (images @ texts.T).numpy()
    local_sims = model.primary_similarity(blocks, words, lengths).numpy()
    for name, rerank in (("global", global_sims), ("local", local_sims),
                         ("fused", 0.6 * global_sims + 0.4 * local_sims)):
        for direction, g, r, ql, gl in (("i2t", global_sims, rerank, image_labels, text_labels),
                                        ("t2i", global_sims.T, rerank.T, text_labels, image_labels)):
            want = shortlist_metrics_reference(g, r, ql.numpy(), gl.numpy(), k)
            for key, value in want.items():
                assert abs(got[name][direction][key] - value) <= 1e-9, (name, direction, key)
    # a shortlist shorter than the gallery really changes mAP here
    assert got["global"]["i2t"]["mAP"] != pytest.approx(
        retrieval_metrics(global_sims, image_labels.numpy(), text_labels.numpy())["i2t"]["mAP"])


def test_global_map_all_in_blocks_equals_the_full_matrix(monkeypatch):
    monkeypatch.setattr(gallery, "BLOCK_ELEMENTS", 50)
    images, texts = integer_embeddings(15, 3, 12), integer_embeddings(30, 3, 13)
    image_labels, text_labels = _labels(15, 2, 14, False)
    got = gallery.global_map_all(images, texts, image_labels, text_labels)
    want = retrieval_metrics((images @ texts.T).numpy(), image_labels.numpy(), text_labels.numpy())
    for direction in ("i2t", "t2i"):
        for key, value in want[direction].items():
            assert abs(got[direction][key] - value) <= TOL


# ---------------------------------------------------------------- evaluate.py --shortlist, end to end

def evaluate_cli(untrained, tiny_data, out, *extra, capsys):
    """evaluate.main in this process (no interpreter start-up), both checkpoints; stdout and the JSON rows."""
    evaluate.main(["--global_ckpt", untrained["global"], "--local_ckpt", untrained["local"],
                   "--global_data_path", tiny_data["coarse"], "--local_data_path", tiny_data["fine"],
                   "--fusion_weight", "0.4", "--device", "cpu", "--output", str(out), *extra])
    return capsys.readouterr().out, json.loads(out.read_text())["rows"]


def evaluate_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--device", "cpu", *argv])
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_evaluate_shortlist_of_all_items_equals_full_evaluation(untrained, tiny_data, tmp_path, capsys):
    _, full = evaluate_cli(untrained, tiny_data, tmp_path / "full.json", capsys=capsys)
    emb = tmp_path / "emb"
    out, short = evaluate_cli(untrained, tiny_data, tmp_path / "short.json", "--shortlist", "20",
                              "--save_embeddings", str(emb), "--map_all", capsys=capsys)
    assert "mAP@20" in out and "global mAP@all over the whole gallery" in out
    for name in ("global", "local", "fused"):
        for direction in ("i2t", "t2i"):
            for key, value in full[name][direction].items():
                assert short[name][direction][key] == pytest.approx(value, abs=1e-6), (name, direction, key)
    assert short["global"]["mAP@all"]["i2t"]["mAP"] == pytest.approx(full["global"]["i2t"]["mAP"], abs=1e-6)
    assert sorted(os.listdir(emb)) == ["caption_labels.npy", "captions.npy", "fingerprint.json",
                                       "image_labels.npy", "images.npy"]
    # reused: a second run reads the saved embeddings and gives the same table
    stamp = os.path.getmtime(emb / "images.npy")
    _, again = evaluate_cli(untrained, tiny_data, tmp_path / "again.json", "--shortlist", "10",
                            "--save_embeddings", str(emb), capsys=capsys)
    assert os.path.getmtime(emb / "images.npy") == stamp
    assert again["global"]["i2t"]["R@1"] == pytest.approx(full["global"]["i2t"]["R@1"], abs=1e-6)


def test_saved_embeddings_of_another_split_are_refused(untrained, tiny_data, tmp_path, capsys):
    emb = tmp_path / "emb"
    evaluate_cli(untrained, tiny_data, tmp_path / "a.json", "--shortlist", "10", "--save_embeddings", str(emb),
                 capsys=capsys)
    err = evaluate_error(["--global_ckpt", untrained["global"], "--data_path", tiny_data["coarse"],
                          "--split", "dev", "--shortlist", "10", "--save_embeddings", str(emb),
                          "--output", str(tmp_path / "b.json")], capsys)
    assert "saved embeddings do not match this run (split, data differ)" in err


def test_shortlist_flag_checks(untrained, capsys):
    assert "--shortlist needs --global_ckpt" in evaluate_error(["--local_ckpt", untrained["local"],
                                                                 "--shortlist", "10"], capsys)
    assert "at least 10" in evaluate_error(["--global_ckpt", untrained["global"], "--shortlist", "5"], capsys)
    assert "go with --shortlist" in evaluate_error(["--global_ckpt", untrained["global"], "--map_all"], capsys)


def test_shortlist_with_three_captions_per_image(tmp_path, capsys):
    generate(str(tmp_path), "three_precomp", {"test": 10}, seed=4, captions_per_image=3, **TINY)
    data = {"coarse": str(tmp_path / "coarse-grained-data"), "fine": str(tmp_path / "fine-grained-data"),
            "name": "three_precomp", "vocab": str(tmp_path / "vocab")}
    # every word known: captions made of unknown words alone would encode alike and tie exactly in float32
    caps = os.path.join(data["coarse"], "three_precomp", "test_caps.txt")
    save_vocab(build_vocab([caps], threshold=1), vocab_file(data["vocab"], "three_precomp"))
    checkpoints = save_untrained(data, tmp_path)
    out, full = evaluate_cli(checkpoints, data, tmp_path / "full.json", capsys=capsys)
    assert "10 images, 30 captions (3 per image)" in out
    _, short = evaluate_cli(checkpoints, data, tmp_path / "short.json", "--shortlist", "30", capsys=capsys)
    for name in ("global", "local", "fused"):
        for direction in ("i2t", "t2i"):
            for key, value in full[name][direction].items():
                assert short[name][direction][key] == pytest.approx(value, abs=1e-6), (name, direction, key)


def test_non_finite_embeddings_are_refused(untrained, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_data["coarse"], tiny_data["name"]), data / tiny_data["name"])
    cnns = np.load(data / tiny_data["name"] / "test_cnns.npy")
    cnns[3] = 3e38  # finite, but the projection overflows float32
    np.save(data / tiny_data["name"] / "test_cnns.npy", cnns)
    err = evaluate_error(["--global_ckpt", untrained["global"], "--data_path", str(data), "--shortlist", "10",
                          "--output", str(tmp_path / "e.json")], capsys)
    assert "global embeddings of the 'test' split hold NaN or inf" in err
