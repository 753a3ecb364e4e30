"""Training options of the comparison runs: --loss triplet (VSE++) against a looped float64 reference,
--relevance instance (positives = the captions of the same image, selection by the instance rsum), and
--early_stop (a stalled run stops; a resume keeps the patience count)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import evaluate
import trainer
from data import collate, length_bucketed_batches, shuffled_batches
from loss import msb_loss, triplet_loss
from options import parse_options
from runtime.errors import InputError
from tests.conftest import make_dataset, train_argv
from tests.references import msb_loss_reference, triplet_loss_reference
from tests.test_reproduce import one_thread  # noqa: F401  (autouse: one torch thread on the shared CPU)

TOL = 1e-6
K = 5


def random_sims(batch: int, seed: int, labels: torch.Tensor, separation: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sims = torch.rand(batch, batch, generator=g, dtype=torch.float64) * 2 - 1
    relevant = (labels[:, None] == labels[None, :]) if labels.dim() == 1 else (labels.double() @ labels.double().T > 0)
    return (sims + separation * relevant.double()).requires_grad_(True)


def labels_case(kind: str, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "diagonal":  # VSE++'s own setting: one positive per row, the pair itself
        return torch.arange(batch)
    if kind == "instance":  # several captions of the same image in the batch
        return torch.randint(0, batch // 2, (batch,), generator=g)
    if kind == "one_label":  # every item relevant to every other: no negative anywhere
        return torch.zeros(batch, dtype=torch.long)
    if kind == "multi_hot":
        labels = (torch.rand(batch, 4, generator=g) < 0.3).long()
        labels[0] = 0  # an item without labels: no positive, not even itself
        return labels
    return torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize("kind,batch,margin,seed", [("diagonal", 9, 0.2, 0), ("instance", 12, 0.2, 1),
                                                    ("labels", 16, 0.5, 2), ("multi_hot", 10, 0.1, 3),
                                                    ("labels", 7, 0.0, 4)])
def test_triplet_loss_matches_the_looped_reference(kind, batch, margin, seed):
    labels = labels_case(kind, batch, seed)
    sims = random_sims(batch, seed, labels)
    loss = triplet_loss(sims, labels, margin)
    (grad,) = torch.autograd.grad(loss, sims)
    ref = triplet_loss_reference(sims, labels, margin)
    (ref_grad,) = torch.autograd.grad(ref, sims)
    assert loss.dtype == torch.float64 and ref.item() > 0
    assert abs(loss.item() - ref.item()) < TOL
    assert torch.allclose(grad, ref_grad, atol=TOL, rtol=0)


def test_triplet_loss_is_vsepp_on_the_diagonal():
    """With one positive per row: sum_i [m - s_ii + max_j!=i s_ij]_+ + sum_j [m - s_jj + max_i!=j s_ij]_+."""
    sims = random_sims(6, 5, torch.arange(6)).detach()
    diagonal = sims.diag()
    off = sims - torch.eye(6, dtype=sims.dtype) * 1e9
    want = ((0.2 - diagonal + off.max(dim=1).values).clamp_min(0).sum()
            + (0.2 - diagonal + off.max(dim=0).values).clamp_min(0).sum())
    assert triplet_loss(sims, torch.arange(6), 0.2).item() == pytest.approx(want.item(), abs=1e-12)


def test_without_negatives_the_triplet_loss_is_zero_with_zero_gradient():
    labels = labels_case("one_label", 5, 0)
    sims = random_sims(5, 0, labels)
    loss = triplet_loss(sims, labels)
    (grad,) = torch.autograd.grad(loss, sims)
    assert loss.item() == 0 and torch.count_nonzero(grad) == 0


@pytest.fixture(scope="module")
def five_data(tmp_path_factory) -> dict:
    return make_dataset(str(tmp_path_factory.mktemp("protocols")), "proto_precomp", {"train": 8, "dev": 6, "test": 6},
                        seed=11, captions_per_image=K)


@pytest.mark.parametrize("kind", ["global", "local"])
@pytest.mark.parametrize("loss_name", ["msb", "triplet"])
def test_batch_loss_uses_image_ids_and_the_chosen_loss(five_data, kind, loss_name, tmp_path):
    """Every similarity term the model returns, with the MSB weights, against the looped references."""
    argv = train_argv(kind, five_data, str(tmp_path), "--relevance", "instance", "--loss", loss_name,
                      "--margin", "0.3")
    run = trainer.Trainer(kind, parse_options(kind, argv))
    try:
        assert torch.equal(run.train_set.labels, torch.arange(8))  # labels became image ids
        batch = collate([run.train_set[i] for i in (0, 1, 2, 7, 9, 14, 30, 31, 33, 39)])
        model = run.model.double()
        batch = (batch[0].double(), batch[1].double(), *batch[2:])
        terms = trainer.batch_loss(model, batch, run.opt, run.device)
        sims = model(batch[0], batch[1], batch[2], batch[3])
        image_ids = batch[5] // K
        assert torch.equal(batch[4], image_ids)
        classes = torch.from_numpy(np.load(os.path.join(run.train_set.folder, "train_labels.npy")))[image_ids]
        reference = {"msb": lambda s: msb_loss_reference(s, image_ids), "triplet":
                     lambda s: triplet_loss_reference(s, image_ids, 0.3)}[loss_name]
        weights = model.loss_weights()
        assert len(weights) == 3
        for name, weight in weights.items():
            assert terms[name].item() == pytest.approx(weight * reference(sims[name]).item(), abs=TOL)
        if loss_name == "msb":  # and the label-level positives would differ
            assert abs(msb_loss(sims["P"], classes).item() - msb_loss(sims["P"], image_ids).item()) > 1e-6
    finally:
        run.release()


def train(kind: str, data: dict, run_dir, *extra: str, capsys=None) -> str:
    trainer.main(kind, train_argv(kind, data, str(run_dir), *extra))
    return capsys.readouterr().out if capsys else ""


@pytest.mark.parametrize("kind", ["global", "local"])
def test_instance_triplet_training_selects_by_the_instance_rsum(five_data, kind, tmp_path, capsys):
    out = train(kind, five_data, tmp_path, "--num_epochs", "2", "--relevance", "instance", "--loss", "triplet",
                capsys=capsys)
    assert "instance mR" in out and "stopped at --num_epochs 2" in out
    best = torch.load(tmp_path / trainer.BEST, weights_only=True)
    assert best["opt"]["relevance"] == "instance" and best["opt"]["loss"] == "triplet"
    summary = evaluate.main([f"--{kind}_ckpt", str(tmp_path / trainer.BEST), "--split", "dev", "--device", "cpu",
                             "--relevance", "instance", "--output", str(tmp_path / "dev.json")])
    assert summary["rows"][kind]["rsum"] == pytest.approx(best["best_rsum"], abs=1e-4)
    assert "warning" not in capsys.readouterr().out  # evaluated as trained
    logged = [line.split() for line in open(tmp_path / "performance.log", encoding="utf-8")]
    assert len(logged) == 3 and all(f[-2] == "rsum" and "instance_mR" in f and "i2t_mAP" in f for f in logged)
    best_line = logged[best["epoch"]]
    assert float(best_line[-1]) == pytest.approx(best["best_rsum"], abs=1e-4)
    assert float(best_line[best_line.index("instance_mR") + 1]) == pytest.approx(best["best_rsum"] / 6, abs=1e-4)


def test_a_stalled_run_stops_early(five_data, tmp_path, capsys):
    # lr 1e-30 leaves every weight as it is: the dev rsum of epoch 1 is never beaten
    out = train("global", five_data, tmp_path, "--num_epochs", "10", "--early_stop", "2", "--learning_rate", "1e-30",
                capsys=capsys)
    assert "early stop after epoch 3: the dev rsum has not improved for 2 epochs" in out
    last = torch.load(tmp_path / trainer.LAST, weights_only=True)
    assert (last["epoch"], last["best_epoch"], last["stop_reason"]) == (3, 1, "early_stop")
    assert "epoch   4/10" not in out


def test_resume_keeps_the_patience_count(five_data, tmp_path, capsys):
    flags = ("--early_stop", "2", "--learning_rate", "1e-30")
    out = train("global", five_data, tmp_path, "--num_epochs", "2", *flags, capsys=capsys)
    assert "stopped at --num_epochs 2 (best dev rsum" in out
    last = torch.load(tmp_path / trainer.LAST, weights_only=True)
    assert (last["epoch"], last["best_epoch"], last["stop_reason"]) == (2, 1, "num_epochs")
    out = train("global", five_data, tmp_path, "--num_epochs", "10", *flags, "--resume", str(tmp_path / trainer.LAST),
                capsys=capsys)
    # one epoch since the best at epoch 1 was already spent before the resume: one more, then stop
    assert "early stop after epoch 3" in out and "epoch   3/10" in out and "epoch   4/10" not in out


def test_an_older_checkpoint_resumes_as_label_msb(five_data, tmp_path, capsys):
    train("global", five_data, tmp_path, "--num_epochs", "1", capsys=capsys)
    state = torch.load(tmp_path / trainer.LAST, weights_only=True)
    for key in ("loss", "margin", "relevance", "early_stop", "length_buckets"):
        del state["opt"][key]
    del state["best_epoch"], state["stop_reason"]
    torch.save(state, tmp_path / trainer.LAST)
    out = train("global", five_data, tmp_path, "--num_epochs", "2", "--resume", str(tmp_path / trainer.LAST),
                capsys=capsys)
    assert "epoch   2/2" in out and "options differ" not in out
    with pytest.raises(InputError, match="--relevance label in the checkpoint, instance given"):
        train("global", five_data, tmp_path, "--num_epochs", "3", "--relevance", "instance", "--resume",
              str(tmp_path / trainer.LAST))


@pytest.mark.parametrize("buckets", [0, 2])
def test_length_buckets_choose_the_epoch_batches(five_data, tmp_path, monkeypatch, buckets):
    drawn = []
    real_loader = trainer.make_loader

    def loader(dataset, batch_size, workers=0, batches=None):
        if batches is not None:  # the training order (evaluation loaders go in dataset order)
            drawn.append(([len(caption) for caption in dataset.captions], batches))
        return real_loader(dataset, batch_size, workers, batches)
    monkeypatch.setattr(trainer, "make_loader", loader)
    train("local", five_data, tmp_path, "--num_epochs", "1", "--batch_size", "8", "--length_buckets", str(buckets))
    [(lengths, batches)] = drawn
    order_rng = torch.Generator().manual_seed(1)  # the --seed default
    expected = (length_bucketed_batches(lengths, 8, order_rng, buckets) if buckets
                else shuffled_batches(len(lengths), 8, order_rng))
    assert batches == expected
