"""The guard of one training run: its folders locked, and one policy for SIGINT / SIGTERM.

Policy. In one process a stop signal raises Interrupted at once, so the loop saves where it stands and
exits with status 130. Under torchrun it is noted, and after each step all ranks agree to stop together,
so rank 0 saves a consistent checkpoint. While a checkpoint is written a signal is only noted: the save is
never split, and the run stops right after it. The handler is installed by `_installed` alone.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

from runtime import distributed
from runtime import run_folder
from runtime.errors import InputError
from runtime.files import check_writable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived during training."""


class RunGuard:
    """Locks on --model_name / --logger_name (rank 0) and the stop signals noted during the run."""

    def __init__(self, opt: dict, kind: str, ctx: distributed.Context):
        self.ctx = ctx
        self.received = 0  # the signal number noted, 0 while none arrived
        self._raising = False  # one process, outside a save: a signal raises Interrupted at once
        self._handlers_in = False
        self.locks: list = []
        refusal = None
        if ctx.is_main:  # rank 0 writes the run folders
            try:
                check_writable(opt["model_name"])  # before any data is read
                check_writable(opt["logger_name"], "log directory")
                self.locks = run_folder.claim(opt, kind)
            except Exception as err:
                refusal = err
        if distributed.any_rank(ctx, refusal is not None):  # under torchrun the others stop with rank 0
            raise refusal or InputError("rank 0 refused the run folders (it says why)")

    def release(self) -> None:
        """Free the run folders for another run."""
        for lock in self.locks:
            lock.release()

    def _on_signal(self, signum, frame) -> None:
        self.received = signum
        if self._raising:
            raise Interrupted(signal.Signals(signum).name)

    @contextmanager
    def _installed(self) -> Iterator[None]:
        """The one place the stop-signal handler is installed (nested uses keep the outer one)."""
        if self._handlers_in:
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._handlers_in = True
        try:
            yield
        finally:
            self._handlers_in = False
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """The training loop's block: stop signals follow the policy of this module."""
        with self._installed():
            self._raising = not self.ctx.enabled
            try:
                yield
            finally:
                self._raising = False

    @contextmanager
    def holding(self) -> Iterator[None]:
        """A block no stop signal may split (a checkpoint save): signals arriving meanwhile are only noted."""
        raising, self._raising = self._raising, False
        try:
            with self._installed():
                yield
        finally:
            self._raising = raising

    def noted(self) -> str | None:
        """The name of the signal noted in this process, or None."""
        return signal.Signals(self.received).name if self.received else None

    def agreed_stop(self) -> str | None:
        """After a step: the name of a signal any rank noted (the same answer on every rank), or None."""
        if not self.ctx.enabled:
            return self.noted()
        received = distributed.max_over_ranks(self.ctx, self.received)
        return signal.Signals(received).name if received else None

    def stop_if_noted_alone(self) -> None:
        """After a save in one process: a signal held back by the save stops the run now. Under torchrun the
        ranks stop together at the next agreed_stop instead."""
        if not self.ctx.enabled and self.received:
            raise Interrupted(self.noted())
