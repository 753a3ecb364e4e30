"""The code paths used before the CPU speed work, switched back on to compare numbers and speed.

Before it, the local attention ran through autograd tensor ops for every score norm (now the L2 norms
have a hand-written backward, on a CPU a fused kernel) on all captions of a batch at once (now in groups
of similar length), the MSB loss ran as tensor ops (now on a CPU a compiled kernel), the text encoders' GRU
always ran on packed sequences (now on the padded batch on CPU when that is faster) and Adam was torch's
default (now its fused kernel). The old attention, loss and GRU paths are still the code's own general paths,
so nothing is copied.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

import encoders
import loss
import model_local
import trainer


@contextmanager
def previous_implementation():
    """Within the block, the models compute as they did before (same numbers, old speed)."""
    saved = (model_local._attend, model_local._kernel_serves, model_local.COLUMN_GROUP, loss._cpu_kernel,
             encoders.UNPACKED_GRU_DEVICES, trainer.adam)
    model_local._attend, model_local.COLUMN_GROUP = model_local.attend_autograd, 1 << 62  # one group
    model_local._kernel_serves = lambda device: False
    loss._cpu_kernel = lambda sims: None
    encoders.UNPACKED_GRU_DEVICES = ()
    trainer.adam = lambda parameters, lr: torch.optim.Adam(parameters, lr=lr)
    try:
        yield
    finally:
        (model_local._attend, model_local._kernel_serves, model_local.COLUMN_GROUP, loss._cpu_kernel,
         encoders.UNPACKED_GRU_DEVICES, trainer.adam) = saved
