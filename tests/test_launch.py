"""launch.py: torchrun with the training scripts' exit rules (gloo on CPU, 2 real ranks, tiny data)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from runtime.checkpoint import load_checkpoint
from tests.conftest import REPO, train_argv
from tests.test_distributed import free_ports
from tests.test_reliability import wait_for


def launch(tiny_data, run_dir, *extra: str) -> subprocess.Popen:
    """launch.py --nproc_per_node 2 train_global.py on the tiny data, as a user types it."""
    argv = train_argv("global", tiny_data, str(run_dir), *extra)
    return subprocess.Popen([sys.executable, "launch.py", "--nproc_per_node", "2", "--master_port",
                             str(free_ports()[0]), "train_global.py", *argv], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("refused_by", ["rank 0", "every rank"])
def test_a_refusal_is_one_line_and_status_2(refused_by, tiny_data, tmp_path):
    if refused_by == "rank 0":  # rank 0 alone claims the run folders
        (tmp_path / "performance.log").write_text("epoch 0 i2t_mAP 1.0 t2i_mAP 1.0 rsum 2.0\n")  # another run's
        process, expected = launch(tiny_data, tmp_path), f"error: {tmp_path}: holds another training run"
    else:  # every rank reads the data and refuses them
        process, expected = launch(tiny_data, tmp_path, "--batch_size", "41"), "error: --batch_size 41 is larger"
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(expected), err


def test_ctrl_c_saves_once_and_ends_with_status_130(tiny_data, tmp_path):
    process = launch(tiny_data, tmp_path, "--num_epochs", "1000")
    wait_for(tmp_path / "checkpoint.pth.tar", process)
    process.send_signal(signal.SIGINT)  # the launcher passes it on to every rank
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.count("SIGINT received") == 1 and "--resume" in err and "Traceback" not in err, err
    assert "ChildFailedError" not in err and "SignalException" not in err, err
    assert load_checkpoint(str(tmp_path / "checkpoint.pth.tar"), "global")["epoch"] >= 1
