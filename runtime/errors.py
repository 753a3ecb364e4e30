"""Errors reported to the user as one clear line by the command-line scripts."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable


class ReportedError(Exception):
    """An error whose message is complete for the user: no traceback is shown."""

    every_rank = False  # under torchrun: printed by every rank (what one rank saw), not by rank 0 alone
    skip_teardown = False  # exit right after the message, without the interpreter's teardown


class InputError(ReportedError):
    """Bad input from the user (a file, a flag, a checkpoint); the message names what and where."""


class OutputError(ReportedError):
    """A file could not be written (a full disk, no permission); the message names it and what was kept."""


class TrainingError(ReportedError):
    """Training had to stop (a non-finite loss); the message says where and what was kept."""


def _rank_zero() -> bool:
    """Rank 0 under torchrun (which sets RANK), or the only process."""
    return os.environ.get("RANK", "0") == "0"


def report_errors(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a CLI entry point: a ReportedError prints one line and exits with status 2, a Ctrl-C that the
    script does not handle itself (loading data, scoring) one line and status 130. Under torchrun rank 0
    alone prints (every rank reads the same input and computes the same numbers), so the ranks' lines do not
    interleave; errors marked every_rank (a lost peer) are printed by each rank."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ReportedError as err:
            if _rank_zero() or err.every_rank:
                print(f"error: {err}", file=sys.stderr)
            if err.skip_teardown:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            sys.exit(2)
        except KeyboardInterrupt:
            if _rank_zero():
                print("\ninterrupted (Ctrl-C); files already written are complete", file=sys.stderr)
            sys.exit(130)
    return wrapper


def check_number(flag: str, value: float, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> None:
    """Refuse a numeric flag that is NaN, infinite or out of range, with one line naming it."""
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {value}")
    if above is not None and value <= above:
        raise InputError(f"{flag} must be greater than {above}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{flag} must be at most {maximum}, got {value}")
