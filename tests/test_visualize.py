"""visualize.py draws retrieval and attention figures on tiny generated data (3 captions per image) with
generated images."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import trainer
import visualize
from synthetic import generate
from tests._images import CATEGORIES, draw_image
from tests.conftest import TINY, train_argv
from vocab import build_vocab, save_vocab, vocab_file

K = 3
TEST_IMAGES = 8


@pytest.fixture(scope="module")
def three_data(tmp_path_factory) -> dict:
    """A 16/8/8-image synthetic dataset with 3 captions per image, and its vocabulary."""
    root = tmp_path_factory.mktemp("three")
    generate(str(root), "three_precomp", {"train": 16, "dev": 8, "test": TEST_IMAGES}, seed=4,
             captions_per_image=K, **TINY)
    coarse = os.path.join(root, "coarse-grained-data")
    caps = [os.path.join(coarse, "three_precomp", f"{s}_caps.txt") for s in ("train", "dev")]
    save_vocab(build_vocab(caps, threshold=1), vocab_file(os.path.join(root, "vocab"), "three_precomp"))
    return {"coarse": coarse, "fine": os.path.join(root, "fine-grained-data"), "name": "three_precomp",
            "vocab": os.path.join(root, "vocab")}


@pytest.fixture(scope="module")
def checkpoints(three_data, tmp_path_factory) -> dict[str, str]:
    """One-epoch global and local checkpoints on the tiny data (one torch thread: the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("visualize_runs")
    paths = {}
    for kind in ("global", "local"):
        trainer.main(kind, train_argv(kind, three_data, str(root / kind), "--num_epochs", "1"))
        paths[kind] = str(root / kind / trainer.BEST)
    yield paths
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images_file(three_data, tmp_path_factory) -> str:
    """A generated picture for every test image row, listed with paths relative to the list's folder."""
    folder = tmp_path_factory.mktemp("pictures")
    labels = np.load(os.path.join(three_data["coarse"], three_data["name"], "test_labels.npy"))
    names = list(CATEGORIES)
    lines = []
    for row, label in enumerate(labels):
        draw_image(names[int(label) % len(names)], row, size=(96, 64)).save(folder / f"row{row}.png")
        lines.append(f"row{row}.png")
    (folder / "test_images.txt").write_text("\n".join(lines) + "\n")
    return str(folder / "test_images.txt")


def visualize_argv(checkpoints: dict, three_data: dict, out_dir: str, *extra: str) -> list[str]:
    return ["--global_ckpt", checkpoints["global"], "--local_ckpt", checkpoints["local"],
            "--global_data_path", three_data["coarse"], "--local_data_path", three_data["fine"],
            "--device", "cpu", "--out_dir", out_dir, "--queries", "3", "--seed", "1", *extra]


def test_writes_retrieval_and_attention_pngs(checkpoints, three_data, images_file, tmp_path) -> None:
    paths = visualize.main(visualize_argv(checkpoints, three_data, str(tmp_path), "--images_file", images_file))
    names = sorted(os.path.basename(p) for p in paths)
    assert names[-2:] == ["image_to_text.png", "text_to_image.png"]
    assert len(names) == 5 and all(n.startswith("attention_") for n in names[:3])
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 150
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 10  # something is drawn, not a blank page


def test_frames_show_relevance(checkpoints, three_data, images_file, tmp_path) -> None:
    """The text-to-image figure holds green and red frame pixels where relevant and other images ranked."""
    visualize.main(visualize_argv(checkpoints, three_data, str(tmp_path), "--images_file", images_file,
                                  "--global_ckpt", "", "--queries", "4"))
    pixels = np.asarray(Image.open(tmp_path / "text_to_image.png").convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    assert visualize.GREEN in colours and visualize.RED in colours


def test_attention_rows_are_distributions(checkpoints, three_data, images_file) -> None:
    args = visualize.parse_args(visualize_argv(checkpoints, three_data, "unused", "--images_file", images_file))
    gallery = visualize.ScoredSplit(args)
    words, weights = visualize.word_attention(gallery, 7)
    caption = gallery.captions[7].lower().split()
    assert words[0] == "<start>" and words[-1] == "<end>" and len(words) == len(caption) + 2
    assert weights.shape == (len(words), 9) and np.allclose(weights.sum(axis=1), 1.0)
    assert gallery.image_of_caption(7) == 2  # caption j describes image j // k


def test_relevance_pairs_images_with_captions(checkpoints, three_data, images_file) -> None:
    args = visualize.parse_args(visualize_argv(checkpoints, three_data, "unused", "--images_file", images_file))
    gallery = visualize.ScoredSplit(args)
    labels = np.load(os.path.join(three_data["coarse"], three_data["name"], "test_labels.npy"))
    assert gallery.sims.shape == gallery.relevant.shape == (TEST_IMAGES, K * TEST_IMAGES)
    assert len(gallery.captions) == K * TEST_IMAGES and len(gallery.images) == TEST_IMAGES
    for i in range(TEST_IMAGES):
        for j in range(K * TEST_IMAGES):
            assert gallery.relevant[i, j] == (labels[i] == labels[j // K])


def test_titles_name_the_classes_the_data_records(checkpoints, three_data, images_file, tmp_path) -> None:
    argv = visualize_argv(checkpoints, three_data, "unused", "--images_file", images_file, "--global_ckpt", "")
    assert visualize.ScoredSplit(visualize.parse_args(argv)).named(0) == ""  # no summary.json: no names
    data = tmp_path / three_data["name"]
    shutil.copytree(os.path.join(three_data["fine"], three_data["name"]), data)
    names = ["ant", "bee", "cat", "dog"]
    (data / "summary.json").write_text(json.dumps({"label_mapping": {n: i for i, n in enumerate(names)}}))
    gallery = visualize.ScoredSplit(visualize.parse_args(argv + ["--local_data_path", str(tmp_path)]))
    labels = np.load(data / "test_labels.npy")
    assert [gallery.named(i) for i in range(TEST_IMAGES)] == [f" ({names[label]})" for label in labels]


def test_missing_images_file_is_one_clear_line(checkpoints, three_data, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        visualize.main(visualize_argv(checkpoints, three_data, str(tmp_path)))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "test_images.txt: images file not found" in err


def test_wrong_number_of_images_is_refused(checkpoints, three_data, images_file, tmp_path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("\n".join(open(images_file).read().split()[:-1]) + "\n")
    with pytest.raises(SystemExit):
        visualize.main(visualize_argv(checkpoints, three_data, str(tmp_path), "--images_file", str(short)))
    assert f"{TEST_IMAGES - 1} image paths for {TEST_IMAGES} feature rows" in capsys.readouterr().err
