"""Resume, atomic checkpoints, interrupts, safe loading, numerical faults and determinism."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate
import loss
import trainer
from runtime import checkpoint
from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import InputError, OutputError, TrainingError, report_errors
from tests.conftest import REPO, run_script, train_argv


TRAIN_GLOBAL = os.path.join(REPO, "train_global.py")


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


def start_training(tiny_data, run_dir, *command):
    """A real training process (command: the script and its own arguments) that runs until it is stopped."""
    argv = train_argv("global", tiny_data, str(run_dir), "--num_epochs", "1000")
    return subprocess.Popen([sys.executable, *command, *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, process, seconds=120):
    """Poll until the running process has written path; stop it and fail if it never does."""
    deadline = time.time() + seconds
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if not os.path.exists(path):
        process.kill()
        pytest.fail(f"{path} never appeared: {process.communicate()[1][-2000:]}")


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


def interrupt_at_epoch_2_batch_3(monkeypatch):
    """Make the next training stop with SIGINT before batch 3 of epoch 2; returns the real train_step."""
    real_step = trainer.Trainer.train_step

    def step_or_stop(self, batch):
        if self.epoch == 1 and self.step == 2:
            raise trainer.Interrupted("SIGINT")
        return real_step(self, batch)
    monkeypatch.setattr(trainer.Trainer, "train_step", step_or_stop)
    return real_step


def test_resume_mid_epoch_is_exact(tiny_data, tmp_path, straight, monkeypatch):
    real_step = interrupt_at_epoch_2_batch_3(monkeypatch)
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
    process = start_training(tiny_data, tmp_path, TRAIN_GLOBAL)
    wait_for(tmp_path / "checkpoint.pth.tar", process)
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
    with pytest.raises(OutputError, match="checkpoint.pth.tar: cannot be written \\(disk full\\)"):
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
    real_loss = loss.msb_loss
    calls = {"n": 0}

    def nan_in_second_epoch(sims, *args):
        calls["n"] += 1
        value = real_loss(sims, *args)
        return value * float("nan") if calls["n"] > 4 + 1 else value  # 4 batches per epoch, 3 terms in one call
    monkeypatch.setattr(loss, "msb_loss", nan_in_second_epoch)
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


SLOW_SAVE_RUN = """
import os, sys, time, types
import torch
import keeper, trainer
from runtime import checkpoint
from runtime.errors import report_errors

target, marker = sys.argv[1], sys.argv[2]
real_save_checkpoint = keeper.save_checkpoint


def write_slowly(obj, f):
    torch.save(obj, f)
    open(marker, "w").close()
    time.sleep(3)  # a full-size checkpoint takes about a second per file; the signal comes in here


def save_checkpoint(state, path):
    slow = os.path.basename(path) == target and not os.path.exists(marker)
    checkpoint.torch = types.SimpleNamespace(save=write_slowly) if slow else torch
    try:
        real_save_checkpoint(state, path)
    finally:
        checkpoint.torch = torch


keeper.save_checkpoint = save_checkpoint
report_errors(trainer.main)("global", sys.argv[3:])
"""


@pytest.mark.parametrize("signums, target", [((signal.SIGINT, signal.SIGINT), "model_best.pth.tar"),
                                             ((signal.SIGTERM,), "checkpoint.pth.tar")])
def test_signal_during_a_save_finishes_both_files(tiny_data, tmp_path, signums, target):
    run_dir, marker = tmp_path / "run", tmp_path / "saving"
    process = start_training(tiny_data, run_dir, "-c", SLOW_SAVE_RUN, target, str(marker))
    wait_for(marker, process)  # epoch 1 is being saved: before it no checkpoint exists at all
    for signum in signums:  # an impatient user presses Ctrl-C twice
        os.kill(process.pid, signum)
        time.sleep(0.1)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"{signums[0].name} received at epoch 2, batch 0" in err and "--resume" in err
    assert "Traceback" not in err and "epoch   1/1000" in out and "*best" in out
    last = load_checkpoint(str(run_dir / "checkpoint.pth.tar"), "global")
    best = load_checkpoint(str(run_dir / "model_best.pth.tar"), "global")
    assert last["epoch"] == best["epoch"] == 1 and last["best_rsum"] == best["best_rsum"]
    logged = {line.split()[1]: float(line.split()[-1]) for line in open(run_dir / "performance.log")}
    assert logged["1"] == pytest.approx(best["best_rsum"], abs=1e-4)  # model_best holds the epoch recorded as best
    assert all(torch.equal(last["model"][k], best["model"][k]) for k in last["model"])
    assert not [name for name in os.listdir(run_dir) if name.startswith(".tmp-")]


def test_a_second_ctrl_c_while_the_stop_saves_is_only_noted(tiny_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-epoch, and again while the stop's save checks the weights: one save, status 130."""
    sent = []
    train_step, check = trainer.Trainer.train_step, trainer.nonfinite_tensors

    def step_then_interrupt(self, batch):
        if self.epoch == 1 and self.step == 1 and not sent:
            sent.append("first")
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, batch)

    def check_with_second_signal(tensors):
        if sent == ["first"]:  # the first check after the first signal is the stop's save
            sent.append("second")
            os.kill(os.getpid(), signal.SIGINT)
        return check(tensors)
    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_interrupt)
    monkeypatch.setattr(trainer, "nonfinite_tensors", check_with_second_signal)
    with pytest.raises(SystemExit) as stop:
        train(tiny_data, tmp_path, "--num_epochs", "3")
    assert stop.value.code == 130 and sent == ["first", "second"]
    assert "SIGINT received at epoch 2, batch 1" in capsys.readouterr().err
    saved = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"), "global")
    assert (saved["epoch"], saved["step"]) == (1, 1)


def test_second_run_on_the_same_folder_is_refused_until_the_first_dies(tiny_data, tmp_path):
    first = start_training(tiny_data, tmp_path, TRAIN_GLOBAL)
    try:
        wait_for(tmp_path / "checkpoint.pth.tar", first)
        second = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1"))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert (f"{tmp_path}: another training run is using this folder (pid {first.pid} on "
                in second.stderr), second.stderr
        assert len([f for f in os.listdir(tmp_path) if f.startswith("events.out")]) == 1  # it wrote nothing there
    finally:
        first.kill()  # SIGKILL: a crash that leaves its lock file behind
        first.communicate(timeout=60)
    third = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1",
                                                      "--resume", str(tmp_path / "checkpoint.pth.tar")))
    assert third.returncode == 0, third.stderr


def copy_dataset(tiny_data, tmp_path):
    """A private copy of the tiny coarse-grained data, to damage."""
    shutil.copytree(tiny_data["coarse"], tmp_path / "coarse")
    return {**tiny_data, "coarse": str(tmp_path / "coarse")}, tmp_path / "coarse" / tiny_data["name"]


def test_huge_features_stop_training_and_keep_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_epoch = trainer.Trainer.train_epoch

    def huge_values_in_epoch_2(self):
        if self.epoch == 1:  # finite but too large for float32 arithmetic: NaN similarities, a zero loss
            self.train_set.cnns[:, :5] = 3e38
        return real_epoch(self)
    monkeypatch.setattr(trainer.Trainer, "train_epoch", huge_values_in_epoch_2)
    with pytest.raises(TrainingError, match=r"gradient norm became nan at epoch 2, batch 1; .*checkpoint.pth.tar"
                                            r" is kept"):
        train(tiny_data, tmp_path, "--num_epochs", "3", "--grad_clip", "0")
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        assert load_checkpoint(str(tmp_path / name))["epoch"] == 1  # loadable: its weights are finite


def test_weights_that_become_inf_stop_training(tiny_data, tmp_path, monkeypatch):
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4 + 2:  # 4 batches per epoch: the update of epoch 2, batch 2 overflows
            self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return result
    monkeypatch.setattr(torch.optim.Adam, "step", overflowing_step)
    with pytest.raises(TrainingError, match=r"weights became NaN or inf \(img_cnn.fc.weight\) at epoch 2, batch 2"):
        train(tiny_data, tmp_path, "--num_epochs", "3")
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        assert load_checkpoint(str(tmp_path / name))["epoch"] == 1


def test_non_finite_weights_are_never_saved_nor_loaded(tiny_data, tmp_path):
    run = trainer.Trainer("global", trainer.parse_options("global", train_argv("global", tiny_data, str(tmp_path))))
    try:
        with torch.no_grad():
            next(run.model.parameters())[0, 0] = float("nan")
        with pytest.raises(TrainingError, match="weights hold NaN or inf .*not saved"):
            run.save(best=True)
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".pth.tar")]
        path = str(tmp_path / "nan.pth.tar")
        save_checkpoint(run.state(), path)
        with pytest.raises(InputError, match=f"{path}: the weights hold NaN or inf"):
            load_checkpoint(path)
    finally:
        run.release()


def test_a_run_that_stops_on_an_error_closes_its_logs(tiny_data, tmp_path):
    run = trainer.Trainer("global", trainer.parse_options("global", train_argv("global", tiny_data, str(tmp_path))))
    run.log.loss(0, 1, 1, {"loss": 1.5}, 2e-4)
    run.release()  # what trainer.main does after an error too, before a lost peer's immediate exit
    assert run.log.performance.closed and run.log.losses.closed
    assert "loss 1.500000" in (tmp_path / "loss.log").read_text()


@pytest.fixture(scope="module")
def one_epoch_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_epoch")
    train(tiny_data, run_dir, "--num_epochs", "1")
    return run_dir


def test_evaluate_refuses_non_finite_weights(one_epoch_run, tiny_data, tmp_path, capsys):
    state = weights(one_epoch_run, "model_best.pth.tar")
    state["model"]["img_cnn.fc.bias"][0] = float("inf")
    path = str(tmp_path / "diverged.pth.tar")
    torch.save(state, path)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--global_ckpt", path, "--data_path", tiny_data["coarse"], "--device", "cpu"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and f"{path}: the weights hold NaN or inf (img_cnn.fc.bias)" in err
    assert "mAP" not in out


def test_evaluate_refuses_non_finite_similarities(one_epoch_run, tiny_data, tmp_path, capsys):
    data, folder = copy_dataset(tiny_data, tmp_path)
    features = np.load(folder / "test_cnns.npy")
    features[[2, 5], :5] = 3e38
    np.save(folder / "test_cnns.npy", features)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--global_ckpt", str(one_epoch_run / "model_best.pth.tar"), "--data_path", data["coarse"],
                       "--device", "cpu", "--output", str(tmp_path / "e.json")])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and f"{folder}: " in err and "similarities of the 'test' split are NaN or inf" in err
    assert "mAP" not in out and not os.path.exists(tmp_path / "e.json")


def test_batch_size_one_is_refused(tiny_data, tmp_path):
    with pytest.raises(InputError, match="--batch_size 1 cannot produce a loss"):
        train(tiny_data, tmp_path, "--batch_size", "1")


def test_an_epoch_without_any_loss_term_warns(tiny_data, tmp_path, capsys):
    data, folder = copy_dataset(tiny_data, tmp_path)
    np.save(folder / "train_labels.npy", np.zeros(40, dtype=np.int64))  # one label: no negatives anywhere
    train(data, tmp_path / "run", "--num_epochs", "1")
    assert "warning: epoch 1: no batch produced a loss term" in capsys.readouterr().err
    logged = [line.split() for line in open(tmp_path / "run" / "loss.log")]
    assert logged and {float(words[words.index("loss") + 1]) for words in logged} == {0.0}


def test_ctrl_c_outside_training_is_one_line(capsys):
    def loading_data():
        raise KeyboardInterrupt  # Ctrl-C while a script reads its data or scores a split

    with pytest.raises(SystemExit) as stop:
        report_errors(loading_data)()
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1
