"""Resume, atomic checkpoints, interrupts, safe loading, numerical faults and determinism."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import trainer
from checkpoint import load_checkpoint, save_checkpoint
from errors import InputError, TrainingError
from tests.conftest import REPO, run_script, train_argv


def train(tiny_data, run_dir, *extra):
    """Train the global subnetwork in-process; returns the best dev rsum."""
    return trainer.main("global", train_argv("global", tiny_data, str(run_dir), *extra))


def weights(run_dir, name="checkpoint.pth.tar"):
    return torch.load(os.path.join(run_dir, name), weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a["epoch"] == b["epoch"] and a["best_rsum"] == b["best_rsum"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train(tiny_data, run_dir, "--num_epochs", "2", "--lr_update", "1")
    return weights(run_dir)


def test_resume_after_an_epoch_is_exact(tiny_data, tmp_path, straight):
    train(tiny_data, tmp_path, "--num_epochs", "1", "--lr_update", "1")
    train(tiny_data, tmp_path, "--num_epochs", "2", "--lr_update", "1",
          "--resume", str(tmp_path / "checkpoint.pth.tar"))
    assert_same_state(weights(tmp_path), straight)


def test_resume_mid_epoch_is_exact(tiny_data, tmp_path, straight, monkeypatch):
    real_step = trainer.Trainer.train_step

    def interrupt_at_epoch_2_batch_3(self, batch):
        if self.epoch == 1 and self.step == 2:
            raise trainer.Interrupted("SIGINT")
        return real_step(self, batch)
    monkeypatch.setattr(trainer.Trainer, "train_step", interrupt_at_epoch_2_batch_3)
    with pytest.raises(SystemExit) as stop:
        train(tiny_data, tmp_path, "--num_epochs", "2", "--lr_update", "1")
    assert stop.value.code == 130
    saved = weights(tmp_path)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    train(tiny_data, tmp_path, "--num_epochs", "2", "--lr_update", "1",
          "--resume", str(tmp_path / "checkpoint.pth.tar"))
    assert_same_state(weights(tmp_path), straight)


def test_interrupt_before_the_epoch_is_evaluated(tiny_data, tmp_path, straight, monkeypatch):
    real_evaluate = trainer.Trainer.evaluate
    calls = {"n": 0}

    def interrupt_second_evaluation(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the first is before training, the second ends epoch 1
            raise trainer.Interrupted("SIGTERM")
        return real_evaluate(self)
    monkeypatch.setattr(trainer.Trainer, "evaluate", interrupt_second_evaluation)
    with pytest.raises(SystemExit):
        train(tiny_data, tmp_path, "--num_epochs", "2", "--lr_update", "1")
    saved = weights(tmp_path)
    assert (saved["epoch"], saved["step"], saved["evaluated"]) == (1, 0, False)
    train(tiny_data, tmp_path, "--num_epochs", "2", "--lr_update", "1",
          "--resume", str(tmp_path / "checkpoint.pth.tar"))
    assert_same_state(weights(tmp_path), straight)
    evaluated = [line.split()[1] for line in open(tmp_path / "performance.log")]
    assert evaluated == ["0", "1", "2"]  # epoch 1 was evaluated after the resume


def test_same_seed_same_losses_and_metrics(tiny_data, tmp_path):
    logs = []
    for name in ("a", "b"):
        train(tiny_data, tmp_path / name, "--num_epochs", "2", "--seed", "7")
        logs.append([open(tmp_path / name / f).read() for f in ("loss.log", "performance.log")])
    assert logs[0] == logs[1] and logs[0][0].count("\n") >= 8


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_resumable_checkpoint(tiny_data, tmp_path, signum):
    argv = train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1000")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "train_global.py"), *argv], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "checkpoint.pth.tar") and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"{signum.name} received" in err and "--resume" in err and "Traceback" not in err
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"), "global")
    assert ckpt["epoch"] >= 1
    resumed = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path),
                                                        "--num_epochs", str(ckpt["epoch"] + 1),
                                                        "--resume", str(tmp_path / "checkpoint.pth.tar")))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint({"kind": "global", "model": {}, "opt": {}, "vocab": {}, "epoch": 1}, path)

    def crash_midway(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(OSError):
        save_checkpoint({"kind": "global", "model": {}, "opt": {}, "vocab": {}, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]  # no temporary file left behind


def test_pickled_object_is_refused(tmp_path):
    path = str(tmp_path / "evil.pth.tar")
    torch.save({"kind": "global", "model": {}, "opt": argparse.Namespace(lr=1), "vocab": {}, "epoch": 0}, path)
    with pytest.raises(InputError, match="refused.*pickled"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, damage):
    path = tmp_path / "c.pth.tar"
    save_checkpoint({"kind": "global", "model": {"w": torch.ones(1000)}, "opt": {}, "vocab": {}, "epoch": 1}, str(path))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(InputError, match="corrupt"):
        load_checkpoint(str(path))


def test_not_a_checkpoint_dict(tmp_path):
    path = str(tmp_path / "w.pth")
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(InputError, match="not an M2HSE checkpoint"):
        load_checkpoint(path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_loss = trainer.msb_loss
    calls = {"n": 0}

    def nan_in_second_epoch(sims, *args):
        calls["n"] += 1
        value = real_loss(sims, *args)
        return value * float("nan") if calls["n"] > 3 * 4 + 3 else value  # 4 batches x 3 terms per epoch
    monkeypatch.setattr(trainer, "msb_loss", nan_in_second_epoch)
    with pytest.raises(TrainingError, match="epoch 2, batch 2"):
        train(tiny_data, tmp_path, "--num_epochs", "3")
    assert weights(tmp_path)["epoch"] == 1


def test_batch_larger_than_dataset(tiny_data, tmp_path):
    result = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path), "--batch_size", "41"))
    assert result.returncode == 2 and "--batch_size 41 is larger than the train split (40 items" in result.stderr


def test_unwritable_output_directory(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path / "run")),
                        "--model_name", str(blocker / "models"))
    assert result.returncode == 2 and "a_file/models: output directory cannot be written" in result.stderr
    assert "Traceback" not in result.stderr
