"""Train through the CLIs on tiny generated data, then evaluate the saved checkpoints through evaluate.py."""
from __future__ import annotations

import json
import os

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
