"""Several captions per image (k·N caption lines for N images, caption j describing image j // k):
loading, scoring and metrics against looped references in float64, and the scripts end to end."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from data import PrecompDataset, collate
from metrics import precision_recall_curve, retrieval_metrics
from model_factory import build_model
from options import parse_options
from runtime.errors import InputError
from scoring import similarity_matrix, validate
from tests.conftest import TINY, TINY_MODEL_FLAGS, make_dataset, run_script, train_argv
from tests.reference_local import attention
from tests.references import inner_product_matrix, precision_recall_reference, ranking_metrics_reference
from vocab import load_vocab, vocab_file

K = 5
IMAGES = {"train": 12, "dev": 8, "test": 8}
TOL = 1e-6
BATCH = 7  # caption batches straddle images, so the padded-mean quirk is exercised across them


@pytest.fixture(scope="module")
def five_data(tmp_path_factory) -> dict:
    """Paths of a 12/8/8-image synthetic dataset with 5 captions per image, and its vocabulary."""
    return make_dataset(str(tmp_path_factory.mktemp("five")), "five_precomp", IMAGES, seed=5, captions_per_image=K)


def vocab_of(data: dict):
    return load_vocab(vocab_file(data["vocab"], data["name"]))


def load(data: dict, kind: str = "global", split: str = "test", data_path: str = "") -> PrecompDataset:
    vocab = vocab_of(data)
    folder = data_path or data["coarse" if kind == "global" else "fine"]
    return PrecompDataset(folder, data["name"], split, vocab, kind, TINY["cnn_dim"], TINY["bovw_dim"])


def float64_model_and_data(data: dict, kind: str, *flags: str, seed: int = 0):
    """A freshly initialised float64 subnetwork of the tiny sizes and the test split in float64."""
    torch.manual_seed(seed)
    dataset = load(data, kind)
    model = build_model(kind, parse_options(kind, [*TINY_MODEL_FLAGS, *flags]), len(vocab_of(data)))
    model = model.double().eval()
    dataset.cnns, dataset.bovws = dataset.cnns.double(), dataset.bovws.double()
    return model, dataset


# ----------------------------------------------------------------------------------------------
# Looped reference, from the definition: one image / one caption / one pair at a time
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def similarity_reference(model, dataset: PrecompDataset, batch_size: int) -> torch.Tensor:
    """S_P[i, c] for every image i and caption c. Each image and each caption is encoded alone; a global
    caption vector is its word sum over the true length divided by the longest caption of its evaluation
    batch (captions c // batch_size share a batch) for padded_mean, by its own length for masked_mean."""
    images = [model.img_cnn(dataset.cnns[i:i + 1])[0] for i in range(dataset.num_images)]
    lengths = [len(c) for c in dataset.captions]
    words = [model.txt_cnn(c[None], torch.tensor([len(c)]))[0] for c in dataset.captions]
    if model.kind == "local":
        return torch.stack([torch.stack([attention(w, img) + attention(img, w) for w in words]) for img in images])
    texts = []
    for c, w in enumerate(words):
        start = c - c % batch_size
        divisor = max(lengths[start:start + batch_size]) if model.opt["text_pooling"] == "padded_mean" else lengths[c]
        total = torch.zeros(w.shape[-1], dtype=w.dtype)
        for t in range(lengths[c]):
            total = total + w[t]
        texts.append(total / divisor)
    return inner_product_matrix(images, texts)


def metrics_reference(sims, image_labels, caption_labels) -> dict:
    """i2t: N image queries over the k·N captions; t2i: k·N caption queries over the N images."""
    return {"i2t": ranking_metrics_reference(sims, image_labels, caption_labels),
            "t2i": ranking_metrics_reference(np.asarray(sims).T, caption_labels, image_labels)}


def assert_metrics_equal(got: dict, want: dict) -> None:
    for direction in ("i2t", "t2i"):
        for key, value in want[direction].items():
            assert got[direction][key] == pytest.approx(value, abs=TOL), (direction, key)
    assert got["rsum"] == pytest.approx(want["i2t"]["mAP"] + want["t2i"]["mAP"], abs=TOL)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["global", "local"])
def test_dataset_items_are_captions_with_their_images(five_data, kind):
    ds = load(five_data, kind, "train")
    n = IMAGES["train"]
    assert ds.captions_per_image == K and ds.num_images == n and len(ds) == K * n == len(ds.captions)
    assert len(ds.cnns) == len(ds.bovws) == len(ds.labels) == n
    assert torch.equal(ds.caption_labels, torch.tensor([int(ds.labels[c // K]) for c in range(K * n)]))
    assert ds.describe() == f"{n} images, {K * n} captions ({K} per image)"
    for c in (0, 4, 5, 13, K * n - 1):
        cnn, bovw, caption, label, index = ds[c]
        assert torch.equal(cnn, ds.cnns[c // K]) and torch.equal(bovw, ds.bovws[c // K])
        assert torch.equal(caption, ds.captions[c]) and label == ds.labels[c // K] and index == c
    # a training batch pairs each caption with its image's features and label
    cnn, _, _, _, labels, ids = collate([ds[c] for c in range(3, 17)])
    assert torch.equal(cnn, ds.cnns[ids // K]) and torch.equal(labels, ds.caption_labels[ids])


def test_layout_with_one_caption_per_image_is_unchanged(tiny_data):
    vocab = load_vocab(vocab_file(tiny_data["vocab"], tiny_data["name"]))
    ds = PrecompDataset(tiny_data["coarse"], tiny_data["name"], "train", vocab, "global", 24, 12)
    assert ds.captions_per_image == 1 and len(ds) == ds.num_images == 40
    assert torch.equal(ds.caption_labels, ds.labels)
    assert all(torch.equal(ds[i][0], ds.cnns[i]) and ds[i][3] == ds.labels[i] for i in range(40))


def copy_split(data: dict, tmp_path, granularity: str = "coarse") -> tuple[str, str]:
    dst = tmp_path / granularity / data["name"]
    shutil.copytree(os.path.join(data[granularity], data["name"]), dst)
    return str(tmp_path / granularity), str(dst)


@pytest.mark.parametrize("extra_lines", [1, 4, -1])
def test_caption_count_not_a_whole_multiple_is_one_clear_line(five_data, tmp_path, extra_lines):
    data_path, folder = copy_split(five_data, tmp_path)
    caps = os.path.join(folder, "train_caps.txt")
    lines = open(caps, encoding="utf-8").read().splitlines()
    lines = lines + ["extra words"] * extra_lines if extra_lines > 0 else lines[:extra_lines]
    open(caps, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        load(five_data, split="train", data_path=data_path)
    message = str(err.value)
    assert message.startswith(caps) and "\n" not in message
    assert f"{60 + extra_lines} captions for 12 images" in message and "whole multiple" in message


def test_bad_caption_count_stops_training_with_one_line(five_data, tmp_path):
    data_path, folder = copy_split(five_data, tmp_path)
    with open(os.path.join(folder, "train_caps.txt"), "a", encoding="utf-8") as f:
        f.write("one more\n")
    result = run_script("train_global.py", *train_argv("global", five_data, str(tmp_path / "run")),
                        "--data_path", data_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "61 captions for 12 images" in result.stderr


def test_image_rows_must_still_agree(five_data, tmp_path):
    data_path, folder = copy_split(five_data, tmp_path)
    np.save(os.path.join(folder, "train_labels.npy"), np.zeros(11, np.int64))
    with pytest.raises(InputError, match=r"disagree \(train_caps.txt: 60, train_cnns.npy: 12, "
                                         r"train_bovws.npy: 12, train_labels.npy: 11\)"):
        load(five_data, split="train", data_path=data_path)


# ----------------------------------------------------------------------------------------------
# Scoring and metrics against the looped reference
# ----------------------------------------------------------------------------------------------

SCORING_CASES = [("global", ("--text_pooling", "padded_mean")), ("global", ("--text_pooling", "masked_mean")),
                 ("local", ())]


@pytest.mark.parametrize("kind,flags", SCORING_CASES)
def test_similarity_matrix_equals_per_pair_scores(five_data, kind, flags):
    model, ds = float64_model_and_data(five_data, kind, *flags)
    encoded_images = []
    hook = model.img_cnn.register_forward_hook(lambda m, inputs, out: encoded_images.append(len(inputs[0])))
    sims = similarity_matrix(model, ds, BATCH, torch.device("cpu"), chunk=1000)
    hook.remove()
    assert sum(encoded_images) == ds.num_images  # each image encoded once, not k times
    ref = similarity_reference(model, ds, BATCH).numpy()
    assert sims.shape == (IMAGES["test"], K * IMAGES["test"]) and sims.dtype == np.float64
    assert np.abs(sims - ref).max() < TOL


def test_padded_mean_quirk_depends_on_caption_order_batches(five_data):
    """The reference is sensitive to the batching it describes: another batch size gives other scores."""
    model, ds = float64_model_and_data(five_data, "global")
    sims = similarity_matrix(model, ds, BATCH, torch.device("cpu"))
    assert np.abs(sims - similarity_reference(model, ds, BATCH + 3).numpy()).max() > 1e-4


@pytest.mark.parametrize("kind,flags", SCORING_CASES)
def test_validate_equals_looped_metrics_over_images_and_captions(five_data, kind, flags):
    model, ds = float64_model_and_data(five_data, kind, *flags, seed=2)
    got = validate(model, ds, BATCH, torch.device("cpu"))
    want = metrics_reference(similarity_reference(model, ds, BATCH).numpy(), ds.labels, ds.caption_labels)
    assert_metrics_equal(got, want)
    # each caption's own image is relevant, so no query goes without a relevant item
    assert got["i2t"]["no_relevant"] == got["t2i"]["no_relevant"] == 0


@pytest.mark.parametrize("chunk", [3, 8, 11])
def test_chunked_local_scoring_equals_unchunked(five_data, chunk):
    model, ds = float64_model_and_data(five_data, "local", seed=3)
    whole = similarity_matrix(model, ds, BATCH, torch.device("cpu"), chunk=1000)
    chunked = similarity_matrix(model, ds, BATCH, torch.device("cpu"), chunk=chunk)
    assert chunked.shape == whole.shape == (8, 40) and np.abs(chunked - whole).max() < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_and_curves_of_rectangular_matrices(seed):
    """N image queries over k·N captions and the transpose, with integer scores (many ties)."""
    rng = np.random.default_rng(seed)
    image_labels = rng.integers(0, 3, 6)
    caption_labels = np.repeat(image_labels, K)
    sims = rng.integers(0, 4, (6, 6 * K)).astype(np.float64)
    assert_metrics_equal(retrieval_metrics(sims, image_labels, caption_labels),
                         metrics_reference(sims, image_labels, caption_labels))
    for matrix, query, gallery in ((sims, image_labels, caption_labels), (sims.T, caption_labels, image_labels)):
        got = precision_recall_curve(matrix, query, gallery, chunk=4)
        assert np.abs(got - precision_recall_reference(matrix, query, gallery)).max() < TOL


# ----------------------------------------------------------------------------------------------
# The scripts end to end on k = 5 data
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def five_runs(five_data, tmp_path_factory) -> dict:
    runs = {}
    for kind in ("global", "local"):
        run_dir = str(tmp_path_factory.mktemp(f"five_{kind}"))
        result = run_script(f"train_{kind}.py", *train_argv(kind, five_data, run_dir, "--num_epochs", "1"))
        assert result.returncode == 0, result.stderr
        runs[kind] = (os.path.join(run_dir, "model_best.pth.tar"), result.stdout)
    return runs


@pytest.mark.parametrize("kind", ["global", "local"])
def test_training_prints_and_stores_captions_per_image(five_runs, kind):
    path, stdout = five_runs[kind]
    assert f"train 12 images, 60 captions ({K} per image), dev 8 images, 40 captions ({K} per image)" in stdout
    assert "epoch   1/1" in stdout
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["captions_per_image"] == K and ckpt["kind"] == kind


def test_fused_evaluation_with_five_captions_per_image(five_runs, five_data, tmp_path):
    out, plot, sims_dir = tmp_path / "e.json", tmp_path / "pr.png", tmp_path / "sims"
    result = run_script("evaluate.py", "--global_ckpt", five_runs["global"][0], "--local_ckpt", five_runs["local"][0],
                        "--global_data_path", five_data["coarse"], "--local_data_path", five_data["fine"],
                        "--tune_fusion", "--chunk", "7", "--device", "cpu", "--output", str(out),
                        "--save_sims", str(sims_dir), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert f"split: test (8 images, 40 captions ({K} per image), five_precomp)" in result.stdout
    table = json.loads(out.read_text())
    assert table["images"] == 8 and table["captions_per_image"] == K
    sims = {k: np.load(sims_dir / f"{k}_test_sims.npy") for k in ("global", "local", "fused")}
    assert all(s.shape == (8, 8 * K) for s in sims.values())
    w = table["fusion_weight"]
    assert np.allclose(sims["fused"], w * sims["global"] + (1 - w) * sims["local"])
    ds = load(five_data, "global")
    for name, matrix in sims.items():
        assert_metrics_equal(table["rows"][name], metrics_reference(matrix, ds.labels, ds.caption_labels))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fusion_refuses_splits_with_different_captions_per_image(five_runs, five_data, tmp_path):
    """Same images and labels, but the local side has one caption per image: fusion is refused."""
    data_path, folder = copy_split(five_data, tmp_path, "fine")
    lines = open(os.path.join(folder, "test_caps.txt"), encoding="utf-8").read().splitlines()
    open(os.path.join(folder, "test_caps.txt"), "w", encoding="utf-8").write("\n".join(lines[::K]) + "\n")
    result = run_script("evaluate.py", "--global_ckpt", five_runs["global"][0], "--local_ckpt", five_runs["local"][0],
                        "--global_data_path", five_data["coarse"], "--local_data_path", data_path,
                        "--device", "cpu", "--output", str(tmp_path / "e.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hold different items" in result.stderr and "8 images, 8 captions (1 per image)" in result.stderr
