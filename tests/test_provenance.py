"""Every result says which data it was made from, and says so when those are not the training data."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import trainer
from tests.conftest import make_dataset, run_script, train_argv

SIZES = {"train": 40, "dev": 20, "test": 20}


@pytest.fixture(scope="module")
def two_places(tmp_path_factory) -> dict:
    """Datasets of the same name in two folders; a global run trained on the first with a relative --data_path."""
    first = make_dataset(str(tmp_path_factory.mktemp("first")), "tiny_precomp", SIZES, seed=3)
    second = make_dataset(str(tmp_path_factory.mktemp("second")), "tiny_precomp", SIZES, seed=4)
    run_dir = os.path.join(first["root"], "run")
    argv = train_argv("global", first, run_dir, "--num_epochs", "1")
    argv[argv.index("--data_path") + 1] = "./coarse-grained-data"
    cwd = os.getcwd()
    os.chdir(first["root"])
    try:
        trainer.main("global", argv)
    finally:
        os.chdir(cwd)
    return {"first": first, "second": second, "ckpt": os.path.join(run_dir, trainer.BEST)}


def test_the_checkpoint_records_the_absolute_folder_and_a_fingerprint(two_places):
    data = torch.load(two_places["ckpt"], weights_only=True)["data"]
    assert data["folder"] == os.path.join(two_places["first"]["coarse"], "tiny_precomp")
    assert data["files"]["train_cnns.npy"]["shape"] == [40, 24] and "sha256" in data["files"]["train_caps.txt"]


def test_evaluate_elsewhere_reads_the_training_folder_and_says_so(two_places, tmp_path):
    output = tmp_path / "eval.json"
    done = run_script("evaluate.py", "--global_ckpt", two_places["ckpt"], "--device", "cpu", "--output",
                      str(output), cwd=two_places["second"]["root"])  # holds another ./coarse-grained-data
    assert done.returncode == 0, done.stderr
    folder = os.path.join(two_places["first"]["coarse"], "tiny_precomp")
    assert f"global data: {folder} (test); same files as in training" in done.stdout
    read = json.loads(output.read_text())["data"]["global"]["test"]
    assert read["folder"] == folder and read["same_as_training"] is True


def test_other_data_are_named_in_one_line_and_in_the_json(two_places, tmp_path):
    copy = tmp_path / "coarse"
    shutil.copytree(two_places["first"]["coarse"], copy)
    features = copy / "tiny_precomp" / "test_cnns.npy"
    np.save(features, np.load(features)[::-1].copy())  # same name and shape, other rows
    output = tmp_path / "eval.json"
    done = run_script("evaluate.py", "--global_ckpt", two_places["ckpt"], "--device", "cpu", "--output",
                      str(output), "--data_path", str(copy))
    assert done.returncode == 0, done.stderr
    notice = [line for line in done.stdout.splitlines() if "differ from the training data" in line]
    assert len(notice) == 1 and "test_cnns.npy differ" in notice[0] and "trained on " in notice[0]
    read = json.loads(output.read_text())["data"]["global"]["test"]
    assert read["same_as_training"] is False and "test_cnns.npy" in read["differs"]


def test_search_json_names_the_folder_it_read(two_places):
    done = run_script("search.py", "--global_ckpt", two_places["ckpt"], "--device", "cpu", "--text", "sky",
                      "--json", "--embeddings", os.path.join(two_places["first"]["root"], "emb"))
    if done.returncode == 2:  # the word may be absent from the tiny vocabulary: any caption word will do
        word = open(os.path.join(two_places["first"]["coarse"], "tiny_precomp", "test_caps.txt")).read().split()[0]
        done = run_script("search.py", "--global_ckpt", two_places["ckpt"], "--device", "cpu", "--text", word,
                          "--json", "--embeddings", os.path.join(two_places["first"]["root"], "emb"))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["data"]["global"]["folder"] == os.path.join(two_places["first"]["coarse"], "tiny_precomp")


@pytest.mark.parametrize("kind", ["caps", "images"])
def test_fusion_refuses_folders_whose_items_differ_in_order(untrained, tiny_data, tmp_path, kind):
    fine = tmp_path / "fine"
    shutil.copytree(tiny_data["fine"], fine)
    folders = [os.path.join(tiny_data["coarse"], tiny_data["name"]), fine / tiny_data["name"]]
    if kind == "images":  # both folders list their images; the fine one in another order
        coarse = tmp_path / "coarse"
        shutil.copytree(tiny_data["coarse"], coarse)
        folders[0] = coarse / tiny_data["name"]
        names = [f"img{i}.jpg\n" for i in range(20)]
        (folders[0] / "test_images.txt").write_text("".join(names))
        (folders[1] / "test_images.txt").write_text("".join(names[::-1]))
    else:  # the same labels, captions in another order
        caps = folders[1] / "test_caps.txt"
        caps.write_text("".join(reversed(caps.read_text().splitlines(keepends=True))))
    done = run_script("evaluate.py", "--global_ckpt", untrained["global"], "--local_ckpt", untrained["local"],
                      "--global_data_path", os.path.dirname(folders[0]), "--local_data_path", str(fine),
                      "--device", "cpu", "--output", str(tmp_path / "eval.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"test_{kind}.txt differ at line 1: fusion needs the two folders to hold the same" in done.stderr
