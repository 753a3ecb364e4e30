"""A whole training epoch in float64 gives the same weights with the fast code paths as with the previous
implementation (tests/reference_previous.previous_implementation), to 1e-6."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import model_local
import trainer as trainer_module
from options import parse_options
from tests.conftest import train_argv
from tests.reference_previous import previous_implementation
from trainer import Trainer

TOL = 1e-6


def weights_after_one_epoch(kind: str, tiny_data: dict, run_dir: str, *extra: str,
                            previous: bool = False) -> tuple[dict, dict]:
    """Initial and trained weights of one float64 epoch (the trainer's own loop and data order); extra: more
    training flags."""
    argv = train_argv(kind, tiny_data, run_dir, "--seed", "4", "--learning_rate", "0.01", *extra)
    with previous_implementation() if previous else nullcontext():
        trainer = Trainer(kind, parse_options(kind, argv))
        try:
            trainer.model.double()
            trainer.optimizer = trainer_module.adam(trainer.model.parameters(), trainer.opt["learning_rate"])
            split = trainer.train_set
            split.cnns, split.bovws = split.cnns.double(), split.bovws.double()
            initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            trainer.train_epoch()
            return initial, trainer.model.state_dict()
        finally:
            trainer.release()


@pytest.mark.parametrize("kind", ["global", "local"])
def test_fast_code_trains_the_same_weights_as_the_previous_code(kind: str, tiny_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(model_local, "COLUMN_GROUP", 3)  # several caption groups in each batch of 10
    initial, fast = weights_after_one_epoch(kind, tiny_data, str(tmp_path / "fast"))
    _, previous = weights_after_one_epoch(kind, tiny_data, str(tmp_path / "previous"), previous=True)
    assert fast.keys() == previous.keys()
    assert not any(fast[k].equal(previous[k]) for k in fast if k.endswith("weight_hh_l0"))  # other code ran
    moved = max((fast[k] - initial[k]).abs().max().item() for k in fast)
    assert moved > 1e-3  # the epoch did train, so equal weights mean equal updates
    for name in fast:
        assert fast[name].dtype == torch.float64
        assert (fast[name] - previous[name]).abs().max().item() < TOL, name
