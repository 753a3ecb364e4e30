"""Train through the CLIs on tiny generated data, then evaluate the saved checkpoints through evaluate.py."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import run_script, train_argv


def train(kind: str, tiny_data: dict, run_dir: str, *extra: str):
    return run_script(f"train_{kind}.py", *train_argv(kind, tiny_data, run_dir, *extra))


@pytest.fixture(scope="module")
def global_run(tiny_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("global_run"))
    result = train("global", tiny_data, run_dir, "--num_epochs", "2", "--lr_updata", "1", "--batchsize", "10")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_global_training_writes_checkpoints_and_logs(global_run):
    run_dir, result = global_run
    assert "before training" in result.stdout and "epoch   2/2" in result.stdout
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "performance.log", "loss.log"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pth.tar"), weights_only=True)
    assert ckpt["kind"] == "global" and ckpt["epoch"] == 2 and isinstance(ckpt["opt"], dict)
    assert ckpt["opt"]["lr_update"] == 1 and ckpt["opt"]["batch_size"] == 10  # the misspelt aliases took effect
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-5)  # lr / 10 after lr_update epochs
    assert len(open(os.path.join(run_dir, "performance.log")).read().splitlines()) == 3


def test_evaluate_global_checkpoint(global_run, tiny_data, tmp_path):
    run_dir, _ = global_run
    out = tmp_path / "eval.json"
    result = run_script("evaluate.py", "--global_ckpt", os.path.join(run_dir, "model_best.pth.tar"),
                        "--data_path", tiny_data["coarse"], "--split", "test", "--device", "cpu",
                        "--output", str(out), "--save_sims", str(tmp_path / "sims"))
    assert result.returncode == 0, result.stderr
    assert "i2t mAP" in result.stdout and "global" in result.stdout
    table = json.loads(out.read_text())
    row = table["rows"]["global"]
    assert table["split"] == "test" and 0 < row["i2t"]["mAP"] <= 100 and 0 < row["t2i"]["mAP"] <= 100
    assert (tmp_path / "sims" / "global_test_sims.npy").exists()


def test_evaluate_falls_back_to_dev(global_run, tiny_data, tmp_path):
    run_dir, _ = global_run
    data = tmp_path / "data"
    os.makedirs(data / tiny_data["name"])
    for name in os.listdir(os.path.join(tiny_data["coarse"], tiny_data["name"])):
        if not name.startswith("test_"):
            os.symlink(os.path.join(tiny_data["coarse"], tiny_data["name"], name), data / tiny_data["name"] / name)
    result = run_script("evaluate.py", "--global_ckpt", os.path.join(run_dir, "model_best.pth.tar"),
                        "--data_path", str(data), "--device", "cpu", "--output", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr
    assert "notice: no test split" in result.stdout
    assert json.loads((tmp_path / "e.json").read_text())["split"] == "dev"


def test_best_dev_score_matches_evaluation(global_run, tiny_data, tmp_path):
    run_dir, _ = global_run
    best = torch.load(os.path.join(run_dir, "model_best.pth.tar"), weights_only=True)
    out = tmp_path / "dev.json"
    run_script("evaluate.py", "--global_ckpt", os.path.join(run_dir, "model_best.pth.tar"), "--split", "dev",
               "--data_path", tiny_data["coarse"], "--device", "cpu", "--output", str(out))
    row = json.loads(out.read_text())["rows"]["global"]
    assert row["i2t"]["mAP"] + row["t2i"]["mAP"] == pytest.approx(best["best_rsum"], abs=1e-4)


def test_missing_vocabulary_is_one_clear_line(tiny_data, tmp_path):
    result = train("global", {**tiny_data, "vocab": str(tmp_path / "novocab")}, str(tmp_path / "run"),
                   "--num_epochs", "1")
    assert result.returncode == 2
    assert "tiny_precomp_vocab.json: vocabulary file not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def local_run(tiny_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("local_run"))
    result = train("local", tiny_data, run_dir, "--num_epochs", "2", "--lr_updata", "50", "--batchsize", "10",
                   "--beta_1", ".4", "--beta_2", ".4")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_local_training_writes_a_local_checkpoint(local_run):
    run_dir, result = local_run
    assert "local-level subnetwork" in result.stdout and "epoch   2/2" in result.stdout
    ckpt = torch.load(os.path.join(run_dir, "model_best.pth.tar"), weights_only=True)
    assert ckpt["kind"] == "local" and ckpt["opt"]["beta_1"] == 0.4
    assert {k.split(".")[0] for k in ckpt["model"]} == {"img_cnn", "img_bovw", "txt_cnn", "txt_bovw"}


def test_fused_evaluation(global_run, local_run, tiny_data, tmp_path):
    out, plot = tmp_path / "fused.json", tmp_path / "pr.png"
    result = run_script("evaluate.py", "--global_ckpt", os.path.join(global_run[0], "model_best.pth.tar"),
                        "--local_ckpt", os.path.join(local_run[0], "model_best.pth.tar"),
                        "--global_data_path", tiny_data["coarse"], "--local_data_path", tiny_data["fine"],
                        "--tune_fusion", "--chunk", "7", "--device", "cpu", "--output", str(out),
                        "--plot", str(plot), "--save_sims", str(tmp_path / "sims"))
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert set(table["rows"]) == {"global", "local", "fused"} and 0.0 <= table["fusion_weight"] <= 1.0
    assert all(line in result.stdout for line in ("global ", "local ", "fused "))
    sims = {k: np.load(tmp_path / "sims" / f"{k}_test_sims.npy") for k in ("global", "local", "fused")}
    w = table["fusion_weight"]
    assert np.allclose(sims["fused"], w * sims["global"] + (1 - w) * sims["local"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fixed_fusion_weight_one_equals_global(global_run, local_run, tiny_data, tmp_path):
    out = tmp_path / "w1.json"
    run_script("evaluate.py", "--global_ckpt", os.path.join(global_run[0], "model_best.pth.tar"),
               "--local_ckpt", os.path.join(local_run[0], "model_best.pth.tar"),
               "--global_data_path", tiny_data["coarse"], "--local_data_path", tiny_data["fine"],
               "--fusion_weight", "1", "--device", "cpu", "--output", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows["fused"]["i2t"] == rows["global"]["i2t"] and rows["fused"]["t2i"] == rows["global"]["t2i"]


def evaluate_error(*args: str) -> str:
    result = run_script("evaluate.py", "--device", "cpu", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    return result.stderr


def test_evaluate_refuses_wrong_kind(global_run, local_run):
    err = evaluate_error("--local_ckpt", os.path.join(global_run[0], "model_best.pth.tar"))
    assert "global-level checkpoint, a local-level one is needed" in err
    err = evaluate_error("--global_ckpt", os.path.join(local_run[0], "model_best.pth.tar"))
    assert "local-level checkpoint, a global-level one is needed" in err


def test_evaluate_refuses_features_that_do_not_fit(global_run, tiny_data):
    err = evaluate_error("--global_ckpt", os.path.join(global_run[0], "model_best.pth.tar"),
                         "--data_path", tiny_data["fine"])
    assert "test_cnns.npy" in err and "axes" in err


def test_evaluate_refuses_mismatched_vocabularies(global_run, local_run, tmp_path):
    ckpt = torch.load(os.path.join(local_run[0], "model_best.pth.tar"), weights_only=True)
    first, second = list(ckpt["vocab"])[4:6]  # same size, two words swapped
    ckpt["vocab"] = {**ckpt["vocab"], first: ckpt["vocab"][second], second: ckpt["vocab"][first]}
    path = tmp_path / "other_vocab.pth.tar"
    torch.save(ckpt, path)
    err = evaluate_error("--global_ckpt", os.path.join(global_run[0], "model_best.pth.tar"), "--local_ckpt", str(path))
    assert "different vocabularies" in err


def test_local_script_refuses_global_features(tiny_data, tmp_path):
    result = run_script("train_local.py", *train_argv("local", tiny_data, str(tmp_path)),
                        "--data_path", tiny_data["coarse"])
    assert result.returncode == 2 and "train_cnns.npy" in result.stderr and "coarse-grained (global)" in result.stderr


def test_multi_hot_labels_and_queries_without_relevant_items(global_run, tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(tiny_data["coarse"], tiny_data["name"]), data / tiny_data["name"])
    labels = np.load(data / tiny_data["name"] / "test_labels.npy")
    multi_hot = np.eye(labels.max() + 1, dtype=np.int64)[labels]
    multi_hot[0] = 0  # an item with no label has no relevant item
    np.save(data / tiny_data["name"] / "test_labels.npy", multi_hot)
    out = tmp_path / "e.json"
    result = run_script("evaluate.py", "--global_ckpt", os.path.join(global_run[0], "model_best.pth.tar"),
                        "--data_path", str(data), "--device", "cpu", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "notice: global i2t: 1 queries have no relevant item" in result.stdout
    assert json.loads(out.read_text())["rows"]["global"]["t2i"]["no_relevant"] == 1
