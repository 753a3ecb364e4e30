"""A whole training epoch in float64 gives the same weights with the fast local attention as with the
previous implementation (tests/reference_local.previous_local_attention), to 1e-6."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from options import parse_options
from tests.conftest import train_argv
from tests.reference_local import previous_local_attention
from trainer import Trainer

TOL = 1e-6


def weights_after_one_epoch(tiny_data: dict, run_dir: str, previous: bool) -> tuple[dict, dict]:
    """Initial and trained weights of one float64 local epoch (the trainer's own loop and data order)."""
    trainer = Trainer("local", parse_options("local", train_argv("local", tiny_data, run_dir, "--seed", "4",
                                                                 "--learning_rate", "0.01")))
    try:
        trainer.model.double()
        trainer.optimizer = torch.optim.Adam(trainer.model.parameters(), lr=trainer.opt["learning_rate"])
        split = trainer.train_set
        split.cnns, split.bovws = split.cnns.double(), split.bovws.double()
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        with previous_local_attention() if previous else nullcontext():
            trainer.train_epoch()
        return initial, trainer.model.state_dict()
    finally:
        trainer.release()


def test_fast_attention_trains_the_same_weights_as_the_previous_code(tiny_data, tmp_path) -> None:
    initial, fast = weights_after_one_epoch(tiny_data, str(tmp_path / "fast"), previous=False)
    _, previous = weights_after_one_epoch(tiny_data, str(tmp_path / "previous"), previous=True)
    assert fast.keys() == previous.keys()
    moved = max((fast[k] - initial[k]).abs().max().item() for k in fast)
    assert moved > 1e-3  # the epoch did train, so equal weights mean equal updates
    for name in fast:
        assert fast[name].dtype == torch.float64
        assert (fast[name] - previous[name]).abs().max().item() < TOL, name
