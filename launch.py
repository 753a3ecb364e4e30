"""torchrun for the training scripts, with their exit rules: one line per failure, status 2 or 130.

  python launch.py --nproc_per_node 2 train_global.py --data_path ./data/coarse-grained-data ...

Any torchrun flag goes before the script (`--standalone`, `--nnodes`, `--rdzv_endpoint`, ...). Plain
torchrun works too, but it ends a refused input with its ChildFailedError report and a Ctrl-C with status 1;
here the ranks' own line (rank 0 prints it) is all that is shown, the status is the ranks' (2 for a refused
input or a reported error, 130 after Ctrl-C / SIGTERM, as in one process), and a rank that died without a
word is named in one line.
"""
from __future__ import annotations

import logging
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

INTERRUPTED = 130  # the training scripts' status after SIGINT / SIGTERM


def failure_status(err: ChildFailedError) -> int:
    """The status of the first rank that failed; a rank killed by a signal is named in one line."""
    rank, failure = err.get_first_failure()
    if failure.exitcode >= 0:
        return failure.exitcode  # the rank printed its own line (rank 0 for a refused input)
    name = signal.Signals(-failure.exitcode).name
    if -failure.exitcode in (signal.SIGINT, signal.SIGTERM):
        return INTERRUPTED
    print(f"error: rank {rank} ended by {name} without a message (killed, or out of memory); resume from the "
          "last checkpoint with the same command plus --resume <--model_name>/checkpoint.pth.tar", file=sys.stderr)
    return 128 - failure.exitcode


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with argv; returns the exit status for the shell."""
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks speak for themselves
    try:
        torchrun(argv)
    except ChildFailedError as err:
        return failure_status(err)
    except SignalException:  # Ctrl-C or SIGTERM to this launcher: torchrun passed it on to every rank
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
