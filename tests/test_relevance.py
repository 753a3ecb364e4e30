"""The instance-level protocol (caption j relevant only to image j // k) against a looped float64 reference:
metrics, duplicate captions, evaluate.py (fusion, tuning, shortlist, saved matrices, plot), search.py and
visualize.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import evaluation
import search
import visualize
from metrics import duplicate_captions, instance_labels, ranking_metrics, retrieval_metrics
from tests.conftest import make_dataset, save_untrained
from tests.references import instance_metrics_reference

K = 5
TOL = 1e-9
TWINS = {1: 7, 12: 30, 13: 31}  # test caption -> a caption of another image it is made identical to


def assert_instance_equal(got: dict, want: dict, tol: float = TOL) -> None:
    for direction in ("i2t", "t2i"):
        for key, value in want[direction].items():
            assert abs(got[direction][key] - value) <= tol, (direction, key, got[direction][key], value)
    assert abs(got["rsum"] - want["rsum"]) <= tol and abs(got["mR"] - want["mR"]) <= tol


def with_twin_columns(sims: np.ndarray) -> np.ndarray:
    """Identical captions get identical scores: each twin's column copies its original's."""
    sims = sims.copy()
    for twin, original in TWINS.items():
        sims[:, twin] = sims[:, original]
    return sims


@pytest.mark.parametrize("n_images,k,integer,seed", [(9, 1, False, 0), (8, K, False, 1), (8, K, True, 2),
                                                     (13, 3, True, 3)])
def test_instance_metrics_match_the_looped_reference(n_images, k, integer, seed):
    rng = np.random.default_rng(seed)
    shape = (n_images, n_images * k)
    sims = rng.integers(-2, 3, shape).astype(np.float64) if integer else rng.standard_normal(shape)
    if k == K:
        sims = with_twin_columns(sims)
    labels = rng.integers(0, 3, n_images)  # ignored by the instance protocol
    got = retrieval_metrics(sims, labels, np.repeat(labels, k), chunk=3, relevance="instance")
    want = instance_metrics_reference(sims, k)
    assert_instance_equal(got, want)
    assert 0 < got["mR"] < 100
    label = retrieval_metrics(sims, labels, np.repeat(labels, k))
    assert abs(label["i2t"]["mAP"] - got["i2t"]["mAP"]) > 1e-6 and "mR" not in label  # really another protocol


@pytest.mark.parametrize("k,integer", [(1, True), (K, True), (3, False)])
def test_instance_fast_path_equals_ranking_with_image_ids_as_labels(k, integer):
    """own_items_metrics counts ranks without sorting; every number (P@K and the counts included) equals the
    sorted label machinery given image ids as labels."""
    rng = np.random.default_rng(k)
    sims = rng.integers(-1, 2, (11, 11 * k)).astype(np.float64) if integer else rng.standard_normal((11, 11 * k))
    images, captions = instance_labels(11, 11 * k)
    got = retrieval_metrics(sims, images, captions, chunk=4, relevance="instance")
    assert got["i2t"] == pytest.approx(ranking_metrics(sims, images, captions), abs=TOL)
    assert got["t2i"] == pytest.approx(ranking_metrics(sims.T, captions, images), abs=TOL)


def test_a_twin_of_another_image_is_not_relevant():
    # caption 2 (image 1) is identical to caption 0 (image 0): equal scores, the lower index ranks first
    sims = np.array([[1.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    got = retrieval_metrics(sims, np.zeros(2), np.zeros(4), relevance="instance")
    assert got["t2i"]["R@1"] == 50.0  # caption 2 (and caption 3, tied) retrieve image 0 first
    assert got["i2t"]["R@1"] == 50.0  # image 1's best caption is caption 0, its twin of image 0
    assert_instance_equal(got, instance_metrics_reference(sims, 2))


def test_duplicate_captions_are_counted_not_merged():
    got = duplicate_captions(["a", "b", "a ", "c", "b", "b"], 2)  # images: (a, b), (a, c), (b, b)
    assert got == {"captions_with_a_twin_of_another_image": 5, "distinct_strings": 3}
    assert duplicate_captions(["x", "x", "y", "z"], 2)["captions_with_a_twin_of_another_image"] == 0  # same image


@pytest.fixture(scope="module")
def twin_data(tmp_path_factory) -> dict:
    """8 test images with 5 captions each, three test captions made identical to captions of other images."""
    root = tmp_path_factory.mktemp("twins")
    data = make_dataset(str(root), "twin_precomp", {"train": 12, "dev": 8, "test": 8}, seed=8, captions_per_image=K)
    for granularity in ("coarse", "fine"):
        path = os.path.join(data[granularity], data["name"], "test_caps.txt")
        lines = open(path, encoding="utf-8").read().splitlines()
        for twin, original in TWINS.items():
            lines[twin] = lines[original]
        open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    data["checkpoints"] = save_untrained(data, root / "untrained")
    return data


def evaluate_argv(data: dict, tmp_path, *extra: str) -> list[str]:
    return ["--global_ckpt", data["checkpoints"]["global"], "--local_ckpt", data["checkpoints"]["local"],
            "--global_data_path", data["coarse"], "--local_data_path", data["fine"], "--device", "cpu",
            "--output", str(tmp_path / "e.json"), *extra]


def test_evaluate_instance_with_fusion_tuning_saved_sims_and_plot(twin_data, tmp_path, capsys):
    sims_dir, plot = tmp_path / "sims", tmp_path / "pr.png"
    summary = evaluate.main(evaluate_argv(twin_data, tmp_path, "--relevance", "instance", "--tune_fusion",
                                          "--save_sims", str(sims_dir), "--plot", str(plot)))
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text()) == summary
    assert summary["relevance"] == "instance"
    twins = len({c for pair in TWINS.items() for c in pair})
    assert summary["duplicate_captions"] == {"captions_with_a_twin_of_another_image": twins, "distinct_strings": 40 - 3}
    assert f"{twins} of 40 captions have an identical twin describing another image" in out
    header = next(line for line in out.splitlines() if "i2t R@1" in line)
    assert " mR " in header and header.index("R@10") < header.index(" mR ") < header.index("i2t mAP")
    for name in ("global", "local", "fused"):
        matrix = np.load(sims_dir / f"{name}_test_sims.npy")
        assert_instance_equal(summary["rows"][name], instance_metrics_reference(matrix, K))
        row = summary["rows"][name]
        assert f"{row['mR']:6.2f}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # w maximises the instance rsum on dev (first best), computed here with the looped reference
    nets = evaluation.open_subnetworks(evaluate.parse_args(evaluate_argv(twin_data, tmp_path)), torch.device("cpu"))
    g, l = nets[0].sims("dev"), nets[1].sims("dev")
    scores = [instance_metrics_reference(w * g + (1 - w) * l, K)["rsum"] for w in evaluation.FUSION_GRID]
    assert summary["fusion_weight"] == pytest.approx(evaluation.FUSION_GRID[int(np.argmax(scores))])


def test_instance_shortlist_of_the_whole_gallery_equals_the_full_evaluation(twin_data, tmp_path, capsys):
    full = evaluate.main(evaluate_argv(twin_data, tmp_path, "--relevance", "instance", "--fusion_weight", "0.4"))
    short = evaluate.main(evaluate_argv(twin_data, tmp_path, "--relevance", "instance", "--fusion_weight", "0.4",
                                        "--shortlist", "40", "--map_all"))
    for name, row in full["rows"].items():
        for direction in ("i2t", "t2i"):
            for key in ("mAP", "R@1", "R@5", "R@10"):
                assert short["rows"][name][direction][key] == pytest.approx(row[direction][key], abs=1e-9)
        assert short["rows"][name]["mR"] == pytest.approx(row["mR"], abs=1e-9)
    assert short["rows"]["global"]["mAP@all"]["i2t"]["mAP"] == pytest.approx(full["rows"]["global"]["i2t"]["mAP"])


def test_protocol_differing_from_training_is_one_warning_line(twin_data, tmp_path, capsys):
    evaluate.main(evaluate_argv(twin_data, tmp_path, "--relevance", "instance"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: evaluated with --relevance instance, trained with global --relevance label, "
                        "local --relevance label"]
    evaluate.main(evaluate_argv(twin_data, tmp_path))  # label, as trained (an old checkpoint: no key)
    assert "warning:" not in capsys.readouterr().out


def test_search_marks_the_query_image_captions_as_relevant(twin_data, tmp_path, capsys):
    argv = ["--global_ckpt", twin_data["checkpoints"]["global"], "--data_path", twin_data["coarse"],
            "--device", "cpu", "--embeddings", str(tmp_path / "emb"), "--image_row", "2", "--top", "40"]
    found = search.main([*argv, "--relevance", "instance"])
    assert {r["row"] for r in found["results"] if r["relevant"]} == set(range(2 * K, 3 * K))
    labels = np.load(os.path.join(twin_data["coarse"], twin_data["name"], "test_labels.npy"))
    found = search.main(argv)
    assert all(r["relevant"] == (labels[r["row"] // K] == labels[2]) for r in found["results"])
    assert "  not relevant  " in capsys.readouterr().out


def test_visualize_frames_follow_the_protocol(twin_data, tmp_path):
    folder = os.path.join(twin_data["coarse"], twin_data["name"])
    with open(os.path.join(folder, "test_images.txt"), "w", encoding="utf-8") as f:
        for row in range(8):
            Image.new("RGB", (32, 24), (30 * row, 80, 120)).save(tmp_path / f"{row}.png")
            f.write(str(tmp_path / f"{row}.png") + "\n")
    args = visualize.parse_args(["--global_ckpt", twin_data["checkpoints"]["global"], "--data_path",
                                 twin_data["coarse"], "--device", "cpu", "--relevance", "instance"])
    gallery = visualize.ScoredSplit(args)
    want = np.arange(40)[None] // K == np.arange(8)[:, None]
    np.testing.assert_array_equal(gallery.relevant, want)
    assert gallery.meaning == visualize.RELEVANT_MEANS["instance"]
