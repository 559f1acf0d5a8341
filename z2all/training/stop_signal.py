"""A clean stop on request: SIGTERM / SIGINT (preemption, Ctrl-C) or ``--exit_after_minutes``.

The handler only records the request. The loop adds ``requested()`` to the one all-reduce it already
does every step, so every rank learns of a request on ANY rank at the same step; that step completes,
a checkpoint is saved there and the run stops with :class:`PreemptedStop` (train_my_ddp.py exits with
exit_codes.PREEMPTED, which a supervisor resumes without counting a crash). More SIGTERMs while the
stop is under way are the same request; a second Ctrl-C (SIGINT) interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptedStop(Exception):
    """The run stopped on request at a step it saved (exit_codes.PREEMPTED); ``timed``: by
    ``--exit_after_minutes`` (the allocation ends: not to be resumed within it)."""

    def __init__(self, message: str, timed: bool = False):
        super().__init__(message)
        self.timed = timed


class StopSignal:
    def __init__(self, exit_after_minutes: float = 0.0):
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes > 0 else None
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: as if we had never installed a handler
                self.restore()
                signal.raise_signal(signum)
            # more SIGTERMs are the same request (Slurm signals every process of a step, a monitor and
            # torchrun forward theirs): the save must not be cut short
            return
        self.received = signal.Signals(signum).name
        logger.warning("%s received: stopping after this step with a checkpoint", self.received)

    def requested(self) -> bool:
        """A signal arrived, or ``--exit_after_minutes`` has passed (on this rank)."""
        return self.received is not None or (self.deadline is not None and time.monotonic() >= self.deadline)

    def timed(self) -> bool:
        return self.received is None and self.deadline is not None and time.monotonic() >= self.deadline

    def reason(self) -> str:
        if self.received is not None:
            return self.received
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "--exit_after_minutes"
        return "a stop request on another rank"

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
