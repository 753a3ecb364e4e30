"""Errors reported to the user as one clear line by the command-line scripts."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class ReportedError(Exception):
    """An error whose message is complete for the user: no traceback is shown."""


class InputError(ReportedError):
    """Bad input from the user (a file, a flag, a checkpoint); the message names what and where."""


class TrainingError(ReportedError):
    """Training had to stop (a non-finite loss); the message says where and what was kept."""


def report_errors(main: Callable[..., object]) -> Callable[..., object]:
    """Wrap a CLI entry point so a ReportedError prints one line and exits with status 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ReportedError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    return wrapper
