"""The CUDA paths give the CPU's numbers: training in float64 to 1e-6, scores to float32 rounding.

They run where torch sees a CUDA device (skipped elsewhere, CI included); docs/TRAINING.md gives the last run.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import run_script, train_argv
from tests.test_epoch_equivalence import TOL, weights_after_one_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["global", "local"])
def test_a_float64_epoch_on_cuda_trains_the_cpu_weights(kind: str, tiny_data, tmp_path) -> None:
    initial, on_cpu = weights_after_one_epoch(kind, tiny_data, str(tmp_path / "cpu"), "--device", "cpu")
    _, on_cuda = weights_after_one_epoch(kind, tiny_data, str(tmp_path / "cuda"), "--device", "cuda")
    assert max((on_cpu[k] - initial[k]).abs().max().item() for k in on_cpu) > 1e-3  # the epoch trained
    for name, weight in on_cuda.items():
        assert weight.is_cuda and weight.dtype == torch.float64, name
        assert (weight.cpu() - on_cpu[name]).abs().max().item() < TOL, name


@pytest.fixture(scope="module")
def cuda_runs(tiny_data, tmp_path_factory) -> dict[str, str]:
    """Checkpoints of both subnetworks trained two epochs on CUDA through the training scripts."""
    runs = {}
    for kind in ("global", "local"):
        run_dir = str(tmp_path_factory.mktemp(f"cuda_{kind}"))
        result = run_script(f"train_{kind}.py", *train_argv(kind, tiny_data, run_dir, "--num_epochs", "2",
                                                            "--device", "auto"))
        assert result.returncode == 0, result.stderr
        assert f"{kind}-level subnetwork on cuda" in result.stdout
        runs[kind] = os.path.join(run_dir, "model_best.pth.tar")
    return runs


def evaluate_on(device: str, runs: dict[str, str], tiny_data: dict, out_dir, *extra: str) -> dict:
    """evaluate.py's table of the CUDA-trained checkpoints on one device; extra: more evaluate.py flags."""
    out_dir.mkdir()
    result = run_script("evaluate.py", "--global_ckpt", runs["global"], "--local_ckpt", runs["local"],
                        "--global_data_path", tiny_data["coarse"], "--local_data_path", tiny_data["fine"],
                        "--device", device, "--output", str(out_dir / "table.json"), *extra)
    assert result.returncode == 0, result.stderr
    return json.loads((out_dir / "table.json").read_text())


def assert_tables_alike(table: dict, other: dict) -> None:
    for row, metrics in other["rows"].items():  # on 20 items a float32 near-tie can swap two ranks (0.07 seen)
        for direction in ("i2t", "t2i"):
            assert abs(table["rows"][row][direction]["mAP"] - metrics[direction]["mAP"]) < 0.5, row


def test_cuda_checkpoints_evaluate_alike_on_cuda_and_cpu(cuda_runs, tiny_data, tmp_path) -> None:
    for path in cuda_runs.values():  # plain tensors on the CPU, whatever device trained them
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert all(not t.is_cuda for t in ckpt["model"].values())
    tables, sims = {}, {}
    for device in ("cuda", "cpu"):
        tables[device] = evaluate_on(device, cuda_runs, tiny_data, tmp_path / device, "--tune_fusion",
                                     "--save_sims", str(tmp_path / device / "sims"))
        sims[device] = {k: np.load(tmp_path / device / "sims" / f"{k}_test_sims.npy")
                        for k in ("global", "local", "fused")}
    for name in sims["cuda"]:
        assert np.abs(sims["cuda"][name] - sims["cpu"][name]).max() < 1e-4, name
    assert tables["cuda"]["fusion_weight"] == tables["cpu"]["fusion_weight"]
    assert set(tables["cuda"]["rows"]) == {"global", "local", "fused"}
    assert_tables_alike(tables["cuda"], tables["cpu"])


def test_shortlist_evaluation_on_cuda_equals_cpu(cuda_runs, tiny_data, tmp_path) -> None:
    tables = {device: evaluate_on(device, cuda_runs, tiny_data, tmp_path / device, "--shortlist", "10")
              for device in ("cuda", "cpu")}
    assert_tables_alike(tables["cuda"], tables["cpu"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["global", "local"])
def test_mixed_precision_trains_on_cuda(kind: str, amp: str, tiny_data, tmp_path) -> None:
    result = run_script(f"train_{kind}.py", *train_argv(kind, tiny_data, str(tmp_path), "--num_epochs", "2",
                                                        "--device", "cuda", "--amp", amp))
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    if amp == "fp16":  # a scale at its start: no step was skipped for non-finite gradients
        assert ckpt["scaler"]["scale"] == torch.amp.GradScaler("cuda").get_scale()
