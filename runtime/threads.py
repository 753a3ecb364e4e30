"""CPU thread policy of the command-line scripts (measured in the README's speed section).

OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so the scripts call passive_wait_policy()
before anything imports torch.
"""
from __future__ import annotations

import os


def passive_wait_policy() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose a policy.

    Spinning threads of one process take the cores that another process's threads wait for; with
    another job beside it a 2-thread training step ran 5x slower than with 1 thread.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def describe() -> str:
    """'2 torch threads (OMP_WAIT_POLICY=PASSIVE)': what this process computes with."""
    import torch
    count, policy = torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "unset")
    return f"{count} torch thread{'s' if count > 1 else ''} (OMP_WAIT_POLICY={policy})"
