"""Retrieval metrics (metrics.py) against the looped references of docs/METHOD.md section 7 (tests/references)."""
from __future__ import annotations

import numpy as np
import pytest

from metrics import precision_recall_curve, ranking_metrics, retrieval_metrics
from tests.references import (average_precision_reference, map_reference, precision_recall_reference,
                              ranking_metrics_reference)

TOL = 1e-9


def random_case(n_query: int, n_gallery: int, n_labels: int, seed: int, integer: bool = False):
    rng = np.random.default_rng(seed)
    sims = rng.integers(-3, 4, size=(n_query, n_gallery)).astype(np.float64) if integer \
        else rng.standard_normal((n_query, n_gallery))
    return sims, rng.integers(0, n_labels, n_query), rng.integers(0, n_labels, n_gallery)


def multi_hot(n: int, n_classes: int, rng) -> np.ndarray:
    y = (rng.random((n, n_classes)) < 0.25).astype(np.int64)
    y[np.arange(n), rng.integers(0, n_classes, n)] = 1
    return y


def assert_metrics_equal(got: dict, want: dict, tol: float = TOL):
    assert set(got) == set(want)
    for key in want:
        assert abs(got[key] - want[key]) <= tol, (key, got[key], want[key])


def test_average_precision_by_hand():
    assert average_precision_reference([True, False, True]) == pytest.approx((1 + 2 / 3) / 2)
    # one query, gallery [rel, non, rel] by similarity 3 > 2 > 1 -> AP 83.33 %
    sims = np.array([[3.0, 2.0, 1.0]])
    assert ranking_metrics(sims, np.array([0]), np.array([0, 1, 0]))["mAP"] == pytest.approx(100 * 5 / 6)


def test_ties_keep_gallery_order():
    # all tied: the ranking is the gallery order, so the relevant item at index 1 sits at rank 2
    sims = np.array([[1.0, 1.0, 1.0]])
    assert map_reference(sims, np.array([0]), np.array([1, 0, 1])) == pytest.approx(50.0)
    assert ranking_metrics(sims, np.array([0]), np.array([1, 0, 1]))["mAP"] == pytest.approx(50.0)
    assert ranking_metrics(sims, np.array([0]), np.array([0, 1, 1]))["mAP"] == pytest.approx(100.0)


@pytest.mark.parametrize("n_query,n_gallery,n_labels,seed,integer", [
    (30, 40, 5, 0, False),
    (40, 40, 3, 1, True),     # integer sims: many ties
    (25, 60, 8, 2, True),
    (50, 35, 10, 3, False),
])
def test_ranking_metrics_match_reference(n_query, n_gallery, n_labels, seed, integer):
    sims, q_lab, g_lab = random_case(n_query, n_gallery, n_labels, seed, integer)
    got = ranking_metrics(sims, q_lab, g_lab)
    want = ranking_metrics_reference(sims, q_lab, g_lab)
    assert_metrics_equal(got, want)
    assert abs(got["mAP"] - map_reference(sims, q_lab, g_lab)) < TOL
    assert 0 < got["mAP"] < 100


def test_integer_ties_differ_from_reverse_tie_order():
    # The tie rule matters on this data: breaking ties by the reversed index changes mAP.
    sims, q_lab, g_lab = random_case(40, 40, 3, 1, integer=True)
    forward = ranking_metrics(sims, q_lab, g_lab)["mAP"]
    reverse = map_reference(sims[:, ::-1], q_lab, g_lab[::-1])
    assert abs(forward - reverse) > 1e-6


def test_multi_hot_labels():
    rng = np.random.default_rng(4)
    sims = rng.integers(0, 5, size=(30, 45)).astype(np.float64)
    q_lab, g_lab = multi_hot(30, 6, rng), multi_hot(45, 6, rng)
    got = ranking_metrics(sims, q_lab, g_lab)
    assert_metrics_equal(got, ranking_metrics_reference(sims, q_lab, g_lab))
    # differs from using only each item's first label, so multi-hot relevance is really exercised
    assert abs(got["mAP"] - map_reference(sims, q_lab.argmax(1), g_lab.argmax(1))) > 1e-6


def test_queries_without_relevant_item_are_left_out_and_counted():
    sims, q_lab, g_lab = random_case(20, 30, 4, 5)
    q_lab[[2, 7, 11]] = 99          # no gallery item has label 99
    got = ranking_metrics(sims, q_lab, g_lab)
    assert got["no_relevant"] == 3
    assert_metrics_equal(got, ranking_metrics_reference(sims, q_lab, g_lab))
    keep = np.ones(20, bool)
    keep[[2, 7, 11]] = False
    assert abs(got["mAP"] - ranking_metrics(sims[keep], q_lab[keep], g_lab)["mAP"]) < TOL


@pytest.mark.parametrize("integer", [False, True])
def test_chunking_is_invisible(integer):
    sims, q_lab, g_lab = random_case(23, 31, 4, 6, integer)
    q_lab[3] = 42
    whole = ranking_metrics(sims, q_lab, g_lab, chunk=10_000)
    pr_whole = precision_recall_curve(sims, q_lab, g_lab, chunk=10_000)
    both_whole = retrieval_metrics(sims[:, :23], q_lab, g_lab[:23], chunk=10_000)
    for chunk in (1, 7, 23):
        assert ranking_metrics(sims, q_lab, g_lab, chunk=chunk) == whole
        np.testing.assert_allclose(precision_recall_curve(sims, q_lab, g_lab, chunk=chunk), pr_whole,
                                   rtol=0, atol=1e-12)
        assert retrieval_metrics(sims[:, :23], q_lab, g_lab[:23], chunk=chunk) == both_whole


def test_recall_and_precision_at_k_by_hand():
    # query 0 (label 0): ranked labels 1, 0, 1, 0, 1, ... -> R@1 = 0, R@5 = 1, P@5 = 2/5
    sims = np.array([np.arange(12, 0, -1, dtype=np.float64)])
    g_lab = np.array([1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    got = ranking_metrics(sims, np.array([0]), g_lab)
    assert got["R@1"] == 0.0 and got["R@5"] == 100.0 and got["R@10"] == 100.0
    assert got["P@1"] == 0.0 and got["P@5"] == pytest.approx(40.0) and got["P@10"] == pytest.approx(20.0)


def test_i2t_uses_rows_and_t2i_uses_columns():
    rng = np.random.default_rng(7)
    n = 30
    sims = rng.standard_normal((n, n)) + 0.5 * rng.standard_normal((n, 1))   # not symmetric
    img_lab, txt_lab = rng.integers(0, 4, n), rng.integers(0, 4, n)
    out = retrieval_metrics(sims, img_lab, txt_lab)
    assert_metrics_equal(out["i2t"], ranking_metrics_reference(sims, img_lab, txt_lab))
    assert_metrics_equal(out["t2i"], ranking_metrics_reference(sims.T, txt_lab, img_lab))
    # the two directions differ, and swapping them would be caught
    assert abs(out["i2t"]["mAP"] - out["t2i"]["mAP"]) > 1e-6
    assert abs(out["i2t"]["mAP"] - map_reference(sims.T, txt_lab, img_lab)) > 1e-6


def test_precision_recall_perfect_ranking_is_one():
    labels = np.repeat(np.arange(4), 5)
    sims = (labels[:, None] == labels[None, :]).astype(np.float64)   # relevant items ranked first
    np.testing.assert_array_equal(precision_recall_curve(sims, labels, labels), np.ones(11))


@pytest.mark.parametrize("seed,integer,multi", [(8, False, False), (9, True, False), (10, True, True)])
def test_precision_recall_matches_reference(seed, integer, multi):
    sims, q_lab, g_lab = random_case(25, 33, 4, seed, integer)
    if multi:
        rng = np.random.default_rng(seed)
        q_lab, g_lab = multi_hot(25, 5, rng), multi_hot(33, 5, rng)
    else:
        q_lab[0] = 77   # a query with no relevant item is left out
    curve = precision_recall_curve(sims, q_lab, g_lab)
    assert curve.shape == (11,)
    assert ((curve >= 0) & (curve <= 1)).all()
    assert (np.diff(curve) <= 1e-12).all()          # interpolated precision never increases
    assert curve[-1] < 1.0                          # random ranking: not perfect
    np.testing.assert_allclose(curve, precision_recall_reference(sims, q_lab, g_lab), rtol=0, atol=TOL)
