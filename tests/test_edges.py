"""Edges of flags and runs a user meets (docs/RELIABILITY.md): finished runs, resumed epoch losses, odd values."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import trainer
from data import PrecompDataset, load_labels
from runtime.errors import InputError, report_errors
from tests.conftest import run_script, train_argv
from tests.test_reliability import interrupt_at_epoch_2_batch_3
from vocab import load_vocab, vocab_file


def epoch_losses(out: str) -> dict[str, str]:
    """'epoch   2/2  loss 14.1234' lines of the trainer's output, by epoch."""
    return dict(re.findall(r"epoch +(\d+)/\d+  loss (\S+)", out))


def test_the_epoch_loss_after_a_mid_epoch_resume_covers_the_whole_epoch(tiny_data, tmp_path, monkeypatch, capsys):
    trainer.main("global", train_argv("global", tiny_data, str(tmp_path / "straight"), "--num_epochs", "2"))
    straight = epoch_losses(capsys.readouterr().out)
    real_step = interrupt_at_epoch_2_batch_3(monkeypatch)
    run_dir = tmp_path / "resumed"
    with pytest.raises(SystemExit):
        trainer.main("global", train_argv("global", tiny_data, str(run_dir), "--num_epochs", "2"))
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    trainer.main("global", train_argv("global", tiny_data, str(run_dir), "--num_epochs", "2",
                                      "--resume", str(run_dir / trainer.LAST)))
    assert epoch_losses(capsys.readouterr().out) == straight  # epoch 1 before the stop, epoch 2 after it


def test_resuming_a_finished_run_says_it_is_finished(tiny_data, tmp_path):
    trainer.main("global", train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1"))
    log = (tmp_path / "performance.log").read_text()
    again = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1",
                                                      "--resume", str(tmp_path / trainer.LAST)))
    assert again.returncode == 0, again.stderr
    assert "this run has already trained 1 epochs, --num_epochs 1: nothing to do" in again.stdout
    assert "raise --num_epochs to train further" in again.stdout
    assert (tmp_path / "performance.log").read_text() == log  # nothing evaluated or appended


@pytest.mark.parametrize("flag, value, message", [("--fusion_weight", "nan", "--fusion_weight must lie in [0, 1]"),
                                                  ("--seed", "-1", "--seed must be at least 0")])
def test_visualize_refuses_odd_flags_before_any_work(untrained, tmp_path, flag, value, message):
    done = run_script("visualize.py", "--global_ckpt", untrained["global"], "--local_ckpt", untrained["local"],
                      "--out_dir", str(tmp_path / "figures"), flag, value)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "figures").exists()


@pytest.mark.parametrize("value", [np.inf, 1e30, -np.inf])
def test_labels_of_inf_or_1e30_are_refused_with_the_row(tmp_path, value):
    labels = np.arange(6, dtype=np.float64) % 3
    labels[4] = value
    np.save(tmp_path / "train_labels.npy", labels)
    with pytest.raises(InputError, match=r"train_labels.npy: labels must be integers of magnitude at most \d+, row 4"):
        load_labels(str(tmp_path / "train_labels.npy"))


def test_a_caption_of_thousands_of_words_is_cut_with_one_notice(untrained, tiny_data, tmp_path):
    shutil.copytree(tiny_data["coarse"], tmp_path / "coarse")
    caps = tmp_path / "coarse" / tiny_data["name"] / "test_caps.txt"
    lines = caps.read_text().splitlines()
    lines[4] = " ".join([lines[4]] * 3000)  # thousands of known words on line 5
    caps.write_text("\n".join(lines) + "\n")
    done = run_script("evaluate.py", "--global_ckpt", untrained["global"], "--data_path", str(tmp_path / "coarse"),
                      "--device", "cpu", "--output", str(tmp_path / "eval.json"))
    assert done.returncode == 0, done.stderr
    notice = [line for line in done.stderr.splitlines() if "--max_caption_words" in line]
    assert len(notice) == 1 and f"{caps}: 1 captions longer than --max_caption_words 100 are cut to 100 words " \
                                "(longest: line 5," in notice[0]
    vocab = load_vocab(vocab_file(tiny_data["vocab"], tiny_data["name"]))
    dataset = PrecompDataset(str(tmp_path / "coarse"), tiny_data["name"], "test", vocab, "global", 24, 12)
    assert max(len(c) for c in dataset.captions) == 102  # 100 words, <start> and <end>


def test_max_caption_words_must_be_positive(tiny_data, tmp_path):
    done = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path), "--max_caption_words", "0"))
    assert done.returncode == 2 and "--max_caption_words must be at least 1" in done.stderr


def rare_words_in(folder, split: str) -> None:
    """Rewrite a split's captions: one word of the vocabulary and two never seen in training per caption."""
    caps = folder / f"{split}_caps.txt"
    lines = caps.read_text().splitlines()
    caps.write_text("".join(f"{line.split()[0]} rare{i}a rare{i}b\n" for i, line in enumerate(lines)))


def evaluate_on(untrained, data_path, tmp_path, *extra):
    return run_script("evaluate.py", "--global_ckpt", untrained["global"], "--data_path", str(data_path),
                      "--device", "cpu", "--output", str(tmp_path / "eval.json"), *extra)


def test_a_sparse_vocabulary_is_told_from_a_foreign_one(untrained, tiny_data, tmp_path):
    shutil.copytree(tiny_data["coarse"], tmp_path / "coarse")
    folder = tmp_path / "coarse" / tiny_data["name"]
    rare_words_in(folder, "test")  # 2 of 3 test words unknown, the train split reads well: sparse
    done = evaluate_on(untrained, tmp_path / "coarse", tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"test_caps.txt: \d+ of 60 caption words \((6|7)\d%\) are not in the vocabulary \(96 entries\), "
                     r"against 0% in the train split: a sparse vocabulary", done.stderr), done.stderr
    rare_words_in(folder, "train")  # the train split too: the vocabulary is foreign to this folder
    refused = evaluate_on(untrained, tmp_path / "coarse", tmp_path)
    assert refused.returncode == 2 and "add --allow_unknown_words to go on" in refused.stderr
    allowed = evaluate_on(untrained, tmp_path / "coarse", tmp_path, "--allow_unknown_words")
    assert allowed.returncode == 0 and "going on (--allow_unknown_words)" in allowed.stderr, allowed.stderr


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_under_torchrun_rank_0_alone_prints_a_refused_input(monkeypatch, capsys, rank, lines):
    def refuse():
        raise InputError("data/x/train_caps.txt: line 3 is an empty caption")
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as stop:
        report_errors(refuse)()
    assert stop.value.code == 2 and len(capsys.readouterr().err.splitlines()) == lines
