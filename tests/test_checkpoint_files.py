"""Checkpoint files: a failed save is one line that keeps the old file, and loading anything is never a traceback."""
from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
from checkpoint import save_checkpoint
from errors import OutputError
from tests.conftest import REPO, train_argv
from tests.test_faults import disk  # noqa: F401  (fixture: a real 2 MiB tmpfs where permitted)


@pytest.fixture(scope="module")
def one_epoch(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_epoch")
    trainer.main("global", train_argv("global", tiny_data, str(run_dir), "--num_epochs", "1"))
    return run_dir


def test_a_full_disk_during_a_large_save_is_one_output_error(disk):  # noqa: F811
    path = disk.folder / "checkpoint.pth.tar"
    save_checkpoint({"kind": "global", "epoch": 1}, str(path))
    before = path.read_bytes()
    disk.fill()
    if disk.real:  # room for the zip's first records, not for the tensor: the disk fills up during the save
        filler = disk.folder / "filler"
        os.truncate(filler, filler.stat().st_size - (256 << 10))
    with pytest.raises(OutputError, match=f"checkpoint.pth.tar: cannot be written \\({os.strerror(errno.ENOSPC)}\\)"):
        save_checkpoint({"kind": "global", "model": {"w": torch.zeros(1 << 20)}}, str(path))  # 4 MiB
    assert path.read_bytes() == before and disk.names() == {"checkpoint.pth.tar"}


def limit_file_size(limit: int):
    """preexec_fn: every file the process writes stops growing at limit bytes (EFBIG), as a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_failed_checkpoint_save_in_training_keeps_the_old_one_and_says_how_to_resume(one_epoch, tiny_data,
                                                                                       tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(one_epoch, folder)
    last = folder / "checkpoint.pth.tar"
    before = last.read_bytes()
    argv = train_argv("global", tiny_data, str(folder), "--num_epochs", "2", "--resume", str(last))
    done = subprocess.run([sys.executable, os.path.join(REPO, "train_global.py"), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size(len(before) // 2))
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err and "Traceback" not in err, done.stderr
    assert f"cannot be written ({os.strerror(errno.EFBIG)})" in err
    assert f"the last saved checkpoint {last} is kept" in err and f"--resume {last}" in err
    assert last.read_bytes() == before
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]
