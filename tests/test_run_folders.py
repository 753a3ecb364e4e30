"""Runs never overwrite runs: a folder holding a run is refused before any data are read (docs/RELIABILITY.md)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import reproduce
import trainer
from runtime.checkpoint import load_checkpoint
from runtime.errors import InputError
from runtime.run_lock import RunLock
from tests.conftest import run_script, train_argv
from tests.test_reproduce import reproduce_argv


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """A global run of one epoch: its folder holds checkpoints, logs and TensorBoard events."""
    run_dir = tmp_path_factory.mktemp("finished")
    trainer.main("global", train_argv("global", tiny_data, str(run_dir), "--num_epochs", "1"))
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


def one_line(process) -> str:
    err = process.stderr.strip()
    assert process.returncode == 2 and "\n" not in err and "Traceback" not in err, process.stderr
    return err


def test_a_new_run_into_a_finished_run_is_refused_before_the_data(finished_run, tiny_data, tmp_path):
    before = snapshot(finished_run)
    argv = train_argv("global", tiny_data, str(finished_run), "--num_epochs", "1")
    argv[argv.index("--data_path") + 1] = str(tmp_path / "no-such-data")  # the refusal comes before the data
    err = one_line(run_script("train_global.py", *argv))
    assert f"{finished_run}: holds another training run" in err
    assert f"--resume {finished_run / 'checkpoint.pth.tar'}" in err and "--overwrite" in err
    assert snapshot(finished_run) == before  # best model, checkpoint and logs untouched


def test_the_other_subnetwork_is_refused_even_with_overwrite(finished_run, tiny_data):
    before = snapshot(finished_run)
    for extra in ((), ("--overwrite",)):
        err = one_line(run_script("train_local.py", *train_argv("local", tiny_data, str(finished_run), *extra)))
        assert f"{finished_run}: holds a global-level run (checkpoint.pth.tar); a local-level run needs its own" in err
    assert snapshot(finished_run) == before


def test_overwrite_archives_the_old_run_and_starts_afresh(finished_run, tiny_data, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, data in snapshot(finished_run).items():
        (folder / name).write_bytes(data)
    before = snapshot(folder)
    done = run_script("train_global.py", *train_argv("global", tiny_data, str(folder), "--num_epochs", "1",
                                                     "--overwrite"))
    assert done.returncode == 0, done.stderr
    archives = [p for p in folder.iterdir() if p.name.startswith("previous-run-")]
    assert len(archives) == 1 and f"moved the previous run in {folder} to {archives[0]}" in done.stdout
    assert snapshot(archives[0]) == before  # every old file, byte for byte
    assert len(open(folder / "performance.log").readlines()) == 2  # the new run's logs alone: epochs 0 and 1


def test_overwrite_and_resume_exclude_each_other(finished_run, tiny_data):
    err = one_line(run_script("train_global.py", *train_argv("global", tiny_data, str(finished_run), "--overwrite",
                                                             "--resume", str(finished_run / "checkpoint.pth.tar"))))
    assert "--overwrite starts a new run and --resume continues one" in err


def test_resume_from_another_folder_into_a_run_is_refused_naming_both(finished_run, tiny_data, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "performance.log").write_text("epoch 0 i2t_mAP 1.0 t2i_mAP 1.0 rsum 2.0\n")  # another run's log
    checkpoint = finished_run / "checkpoint.pth.tar"
    before = snapshot(other)
    err = one_line(run_script("train_global.py", *train_argv("global", tiny_data, str(other), "--num_epochs", "2",
                                                             "--resume", str(checkpoint))))
    assert f"{other}: holds another training run (performance.log), and --resume {checkpoint} continues the run " \
           f"of {finished_run}; give --model_name / --logger_name {finished_run} to continue it there" in err
    assert snapshot(other) == before


def test_resume_from_another_folder_into_a_free_folder_continues_there(finished_run, tiny_data, tmp_path):
    source = snapshot(finished_run)
    argv = train_argv("global", tiny_data, str(tmp_path / "next"), "--num_epochs", "2",
                      "--resume", str(finished_run / "checkpoint.pth.tar"))
    trainer.main("global", argv)
    assert load_checkpoint(str(tmp_path / "next" / "checkpoint.pth.tar"))["epoch"] == 2
    assert snapshot(finished_run) == source  # the source run is only read


def test_the_lock_is_taken_before_the_data_are_read(tiny_data, tmp_path):
    lock = RunLock(str(tmp_path))  # another run holds the folder
    try:
        argv = train_argv("global", tiny_data, str(tmp_path))
        argv[argv.index("--data_path") + 1] = str(tmp_path / "no-such-data")
        with pytest.raises(InputError, match="another training run is using this folder"):
            trainer.main("global", argv)
    finally:
        lock.release()


def test_reproduce_restarts_a_stage_stopped_before_its_first_checkpoint(tiny_data, tmp_path, capsys):
    argv = reproduce_argv(tiny_data, str(tmp_path), "--seeds", "1")
    folder = Path(tmp_path, "runs", tiny_data["name"], "full", "global", "seed1")
    folder.mkdir(parents=True)
    (folder / "performance.log").write_text("epoch 0 i2t_mAP 1.0 t2i_mAP 1.0 rsum 2.0\n")  # killed in epoch 1
    reproduce.main(argv)
    assert "--overwrite: moved the previous run" in capsys.readouterr().out
    archived = [p for p in folder.iterdir() if p.name.startswith("previous-run-")]
    assert (archived[0] / "performance.log").read_text().startswith("epoch 0 i2t_mAP 1.0")
    assert (folder / "checkpoint.pth.tar").is_file()
