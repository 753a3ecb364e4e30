"""Data-parallel training (gloo on CPU): 2 ranks x B/2 equal 1 process x B; signals, dead ranks, checkpoints."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import trainer
from runtime.checkpoint import load_checkpoint
from runtime.distributed import Context
from tests.conftest import REPO, train_argv
from tests.test_reliability import wait_for

BATCH = "7"  # 40 items: batches of 7 split 3 + 4 and a last one of 5 split 2 + 3
KINDS = ("global", "local")


def free_ports(count: int = 1) -> list[int]:
    """Distinct ports that were free a moment ago (all held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun sets for each worker."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}


def in_float64_recording_losses(monkeypatch) -> list[dict[str, float]]:
    """Build models and features in float64 and record every step's loss terms."""
    real_build, real_dataset, real_step = trainer.untrained_model, trainer.Trainer._dataset, trainer.Trainer.train_step
    losses: list[dict[str, float]] = []

    def dataset(self, split):
        data = real_dataset(self, split)
        data.cnns, data.bovws = data.cnns.double(), data.bovws.double()
        return data

    def step(self, batch):
        losses.append(real_step(self, batch))
        return losses[-1]
    monkeypatch.setattr(trainer, "untrained_model", lambda *args: real_build(*args).double())
    monkeypatch.setattr(trainer.Trainer, "_dataset", dataset)
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    return losses


def two_rank_worker(rank: int, ports: list[int], tiny_data: dict, run_root: str) -> None:
    """One torchrun-like rank: trains one epoch of each subnetwork in float64, rank 0 saves its losses."""
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        losses = in_float64_recording_losses(monkeypatch)
        for kind, port in zip(KINDS, ports):  # a fresh port per process group
            os.environ.update(rank_env(rank, 2, port))
            losses.clear()
            run_dir = os.path.join(run_root, kind)
            trainer.main(kind, train_argv(kind, tiny_data, run_dir, "--num_epochs", "1", "--batch_size", BATCH))
            if rank == 0:
                torch.save(list(losses), os.path.join(run_dir, "losses.pt"))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float64 and torch.allclose(a, b, atol=1e-6, rtol=0)


def assert_same_training(distributed: dict, single: dict) -> None:
    assert list(distributed["model"]) == list(single["model"])  # same keys: no `module.` prefix
    assert (distributed["epoch"], distributed["step"]) == (single["epoch"], single["step"])
    for key, value in single["model"].items():
        assert close(distributed["model"][key], value), key
    for a, b in zip(distributed["optimizer"]["state"].values(), single["optimizer"]["state"].values()):
        assert close(a["exp_avg"], b["exp_avg"]) and close(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.fixture(scope="module")
def two_rank_runs(tiny_data, tmp_path_factory):
    """One epoch of each subnetwork trained by 2 gloo ranks (torch.multiprocessing.spawn)."""
    root = tmp_path_factory.mktemp("two_ranks")
    ranks = mp.spawn(two_rank_worker, args=(free_ports(len(KINDS)), tiny_data, str(root)), nprocs=2, join=False)
    deadline = time.time() + 300  # a rank that never exits fails the test instead of hanging the suite
    while not ranks.join(timeout=max(0.0, deadline - time.time())):
        if time.time() >= deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the ranks did not exit within 300 s; their folders: {sorted(map(str, root.rglob('*')))}")
    return root


def single_process(kind: str, tiny_data: dict, run_dir, monkeypatch, *extra: str) -> list[dict[str, float]]:
    """Train in this process in float64 with 1 thread; returns the recorded step losses."""
    losses = in_float64_recording_losses(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.main(kind, train_argv(kind, tiny_data, str(run_dir), "--batch_size", BATCH, *extra))
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_one_process_in_float64(kind, two_rank_runs, tiny_data, tmp_path, monkeypatch):
    single_losses = single_process(kind, tiny_data, tmp_path, monkeypatch, "--num_epochs", "1")
    two_losses = torch.load(two_rank_runs / kind / "losses.pt", weights_only=True)
    assert len(single_losses) == len(two_losses) == 6
    for one, two in zip(single_losses, two_losses):
        assert one.keys() == two.keys() and all(abs(one[k] - two[k]) < 1e-6 for k in one), (one, two)
    assert_same_training(load_checkpoint(str(two_rank_runs / kind / "checkpoint.pth.tar"), kind),
                         load_checkpoint(str(tmp_path / "checkpoint.pth.tar"), kind))


def test_two_rank_checkpoint_resumes_in_one_process(two_rank_runs, tiny_data, tmp_path, monkeypatch):
    single_process("global", tiny_data, tmp_path / "straight", monkeypatch, "--num_epochs", "2")
    resumed = tmp_path / "resumed"
    single_process("global", tiny_data, resumed, monkeypatch, "--num_epochs", "2",
                   "--resume", str(two_rank_runs / "global" / "checkpoint.pth.tar"))
    assert_same_training(load_checkpoint(str(resumed / "checkpoint.pth.tar")),
                         load_checkpoint(str(tmp_path / "straight" / "checkpoint.pth.tar")))


def test_rank_slices_concatenate_to_the_batch():
    batch = list(range(100, 111))
    for world_size in (1, 2, 3, 4):
        slices = [Context(rank, world_size).my_slice(batch) for rank in range(world_size)]
        assert sum(slices, []) == batch and max(map(len, slices)) - min(map(len, slices)) <= 1


def test_torchrun_sigterm_stops_all_ranks_with_one_checkpoint(tiny_data, tmp_path):
    argv = train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1000", "--batch_size", "10")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(free_ports()[0]), "train_global.py", *argv], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "checkpoint.pth.tar", launcher)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
    out, err = launcher.communicate(timeout=120)
    assert err.count("SIGTERM received") == 1 and "--resume" in err, err  # rank 0 alone saves and says so
    assert out.count("before training") == 1  # rank 0 alone evaluates and prints
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pth.tar"), "global")
    assert ckpt["epoch"] >= 1 and not any(key.startswith("module.") for key in ckpt["model"])
    assert sorted(os.listdir(tmp_path)).count("checkpoint.pth.tar") == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_lost_rank_stops_the_other_with_a_clear_message(fault, tiny_data, tmp_path):
    argv = train_argv("global", tiny_data, str(tmp_path), "--num_epochs", "1000", "--batch_size", "10",
                      "--dist_timeout", "0.1")  # a hung peer is given up after 6 s
    port = free_ports()[0]
    ranks = [subprocess.Popen([sys.executable, "train_global.py", *argv], cwd=REPO, text=True,
                              env={**os.environ, **rank_env(rank, 2, port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    wait_for(tmp_path / "checkpoint.pth.tar", ranks[0])
    ranks[1].send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
    try:
        _, err = ranks[0].communicate(timeout=60)  # no hang: the survivor stops by itself
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()
    assert ranks[0].returncode == 2, err
    assert "rank 0 of 2: another process of the run stopped or stopped answering" in err, err
    assert f"--resume {tmp_path / 'checkpoint.pth.tar'}" in err and "Traceback" not in err, err


def test_fp16_is_refused_on_cpu(tiny_data, tmp_path):
    with pytest.raises(trainer.InputError, match="--amp fp16 needs a CUDA device"):
        trainer.main("global", train_argv("global", tiny_data, str(tmp_path), "--amp", "fp16"))


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_keeps_similarities_and_loss_in_float32(kind, tiny_data, tmp_path):
    t = trainer.Trainer(kind, trainer.parse_options(kind, train_argv(kind, tiny_data, str(tmp_path), "--amp", "bf16")))
    batch = next(iter(trainer.make_loader(t.train_set, 10)))
    mixed = trainer.batch_loss(t.model, batch, t.opt, t.device)
    full = trainer.batch_loss(t.model, batch, {**t.opt, "amp": "off"}, t.device)
    cnn, bovw, captions, lengths, _, _ = batch
    projected = []
    t.model.img_cnn.fc.register_forward_hook(lambda module, inputs, output: projected.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = t.model.encode(cnn, bovw, captions, lengths)
        sims = t.model(cnn, bovw, captions, lengths)
    assert projected == [torch.bfloat16, torch.bfloat16]  # the encoders did run in bf16 ...
    assert all(v.dtype == torch.float32 for k, v in encoded.items() if k != "lengths")  # ... and are normalised in float32
    assert all(s.dtype == torch.float32 for s in sims.values())
    assert mixed["loss"].dtype == torch.float32 and mixed["loss"].requires_grad
    assert abs(mixed["loss"].item() - full["loss"].item()) < 0.05 * abs(full["loss"].item())
    assert t.train_step(batch)["loss"] == pytest.approx(mixed["loss"].item())
