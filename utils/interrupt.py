"""Pre-emption: SIGINT / SIGTERM become a request that training polls between meta-iterations.

A cluster that pre-empts a job sends SIGTERM and kills it a little later; Ctrl-C sends SIGINT.
Either way the run finishes the iteration it is in, writes a resumable checkpoint and exits with
`INTERRUPTED_EXIT_CODE`, so a job script can tell "stopped, resume me" from a failure. A second
signal stops at once the way the signal normally would (the last checkpoint stays intact: every
write is atomic).

The handler only sets a flag: printing or saving inside a signal handler could interrupt a write
to the same stream or file.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
INTERRUPTED_EXIT_CODE = 75
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint; the message says how to resume."""


class StopRequest:
    """`with stop:` installs the handlers; `stop.signal_name` is then the first signal received, or None."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "StopRequest":
        self.signal_name = None
        # Python lets only the main thread install handlers; elsewhere the default behaviour stays.
        if threading.current_thread() is threading.main_thread():
            # A signal the process inherited as ignored stays ignored (the classic Unix rule): a shell starts
            # `command &` with SIGINT ignored, and a job meant to be deaf to Ctrl-C must not start hearing it.
            self._previous = {number: signal.signal(number, self._handle) for number in HANDLED_SIGNALS
                              if signal.getsignal(number) != signal.SIG_IGN}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(number).name
            return
        # The second signal: behave as if we had never been installed (SIGINT raises KeyboardInterrupt,
        # SIGTERM terminates the process).
        self._restore()
        signal.raise_signal(number)
