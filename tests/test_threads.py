"""Thread policy of the training scripts: OpenMP threads sleep when idle unless the user says otherwise,
and the thread count in use is printed."""
from __future__ import annotations

import pytest

from tests.conftest import run_script, train_argv


@pytest.mark.parametrize("user_policy, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_train_script_prints_threads_and_keeps_a_user_wait_policy(user_policy, expected, tiny_data, tmp_path,
                                                                  monkeypatch):
    if user_policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user_policy)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script("train_global.py", *train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1"))
    assert result.returncode == 0, result.stderr
    assert f"1 torch thread (OMP_WAIT_POLICY={expected})" in result.stdout
