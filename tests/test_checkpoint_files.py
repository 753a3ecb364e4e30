"""Checkpoint files: a failed save is one line that keeps the old file, and loading anything is never a traceback."""
from __future__ import annotations

import errno
import gzip
import io
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

import pytest
import torch

import trainer
from model_factory import load_trained
from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import InputError, OutputError
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


def malformed_files(real: bytes, folder: Path) -> list[Path]:
    """Many files that are not checkpoints of this project: text, random bytes, truncated and damaged
    checkpoints, other pickles and zip archives, and checkpoint dicts with missing or ill-typed fields."""
    rng = np.random.default_rng(0)
    blobs = [b"", b"\n", b"epoch 1 i2t_mAP 35.5 t2i_mAP 38.1 rsum 73.7\n" * 3, b'{"kind": "global"}',
             "caf\u00e9 \u00e9t\u00e9\n".encode() * 2000, b"\x80\x02", b"\x80\x02}q\x00.", pickle.dumps([1, 2, 3]),
             pickle.dumps({"kind": "global"}), b"PK\x03\x04", b"PK\x03\x04" + bytes(100), gzip.compress(real),
             b"\x93NUMPY" + bytes(200)]
    blobs += [rng.bytes(int(n)) for n in rng.integers(1, 5000, 60)]
    blobs += [real[:int(n)] for n in np.linspace(1, len(real) - 1, 60)]
    paths = []
    for number in range(60):  # bytes changed anywhere: inside tensor data they may still load as weights
        damaged = np.frombuffer(real, np.uint8).copy()
        damaged[rng.integers(0, len(real), 8)] = rng.integers(0, 256, 8)
        paths.append(folder / f"damaged{number}.pth.tar")
        paths[-1].write_bytes(damaged.tobytes())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    blobs.append(buffer.getvalue())
    for number, blob in enumerate(blobs):
        paths.append(folder / f"blob{number}.pth.tar")
        paths[-1].write_bytes(blob)
    state = torch.load(io.BytesIO(real), weights_only=True)
    variants = [[1, 2], "text", {}, {**state, "kind": "foo"}, {**state, "kind": 3}, {**state, "model": [1]},
                {**state, "model": {"w": "x"}}, {**state, "vocab": ["a"]}, {**state, "vocab": {"a": "0"}},
                {**state, "vocab": {"<pad>": 0, "<start>": 5}}, {**state, "epoch": "one"}, {**state, "epoch": -1},
                {**state, "opt": None}, {**state, "opt": {**state["opt"], "cnn_dim": "24"}},
                {**state, "opt": {**state["opt"], "embed_size": 0}},
                {**state, "opt": {k: v for k, v in state["opt"].items() if k != "cnn_dim"}},
                {**state, "opt": {**state["opt"], "text_pooling": None}},
                {**state, "model": {k: v[:1] for k, v in state["model"].items()}}]
    variants += [{k: v for k, v in state.items() if k != key} for key in ("kind", "model", "opt", "vocab", "epoch")]
    for number, variant in enumerate(variants):
        paths.append(folder / f"dict{number}.pth.tar")
        torch.save(variant, paths[-1])
    return paths


def test_no_file_makes_checkpoint_loading_traceback(one_epoch, tmp_path):
    real = (one_epoch / "checkpoint.pth.tar").read_bytes()
    paths = malformed_files(real, tmp_path)
    loaded = []
    for path in paths:
        try:
            load_trained(str(path), "global", torch.device("cpu"))
            loaded.append(path.name)
        except InputError as err:
            message = str(err)
            assert message.startswith(f"{path}: ") and "\n" not in message, message
            if not path.read_bytes().startswith(b"PK"):  # stray bytes, text or plain pickles: no code named
                assert "pickled Python objects" not in message, message
    assert len(paths) > 200 and all(name.startswith("damaged") for name in loaded), loaded


def test_random_bytes_and_text_are_named_as_such(tmp_path):
    for blob, words in ((b"epoch 1 i2t_mAP 35.5\n", "a text file, not a checkpoint"),
                        (bytes(range(256)) * 4, "not a PyTorch checkpoint (unrecognised bytes)"),
                        (b"", "an empty file")):
        (tmp_path / "file").write_bytes(blob)
        with pytest.raises(InputError, match=re.escape(words)):
            load_checkpoint(str(tmp_path / "file"))


def test_a_damaged_training_state_cannot_be_resumed_and_says_so(one_epoch, tiny_data, tmp_path):
    state = torch.load(one_epoch / "checkpoint.pth.tar", weights_only=True)
    for broken in ({**state, "optimizer": {"state": 3}}, {**state, "torch_rng": torch.zeros(3)},
                   {k: v for k, v in state.items() if k != "order_rng"}, {**state, "step": "x"}):
        path = tmp_path / "checkpoint.pth.tar"
        torch.save(broken, path)
        with pytest.raises(InputError, match="cannot be resumed, its training state is missing or damaged"):
            trainer.main("global", train_argv("global", tiny_data, str(tmp_path / "run"), "--resume", str(path)))
