"""How a search ends when it is asked to: Ctrl-C (SIGINT) and SIGTERM (what `timeout`, a scheduler or `kill`
sends) both stop it promptly and leave it resumable; only the exit code tells them apart (130, 143).

Decisions: while `Tuner.fit` runs, SIGTERM is passed on as SIGINT, which Tune turns into a graceful stop (the
running trials abandoned, the partial tables written); outside `fit`, or on a second signal, the driver stops
at once (`Interrupted`). The handler replaces Ray's own SIGTERM handler in the driver, which printed a C++ stack
dump. Trials stopped by Tune are killed after `TUNE_FORCE_TRIAL_CLEANUP_S` seconds, not Tune's default 600.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

TRIAL_CLEANUP_S = "3"  # how long Tune waits for a stopped trial before it kills the trial's process


class Interrupted(KeyboardInterrupt):
    """The search was stopped by `signum` (SIGINT or SIGTERM); `exit_code` is 128 + signum; `outcome`, the
    partial search outcome when the stop was graceful (its tables are written)."""

    def __init__(self, signum: int, outcome: Any = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.outcome = outcome

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """The signals received so far, and whether Tune's `fit` is running (it stops gracefully on SIGINT)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.fitting = False

    @property
    def terminated(self) -> bool:
        return signal.SIGTERM in self.received

    def on_term(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.fitting and len(self.received) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Tune's graceful stop
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def fit(self) -> Iterator[None]:
        self.fitting = True
        try:
            yield
        finally:
            self.fitting = False

    def install(self) -> None:
        """Take SIGTERM (again: starting Ray installs its own handler); only the main thread can."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.on_term)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Handle SIGTERM like Ctrl-C for the duration (call `install()` again once Ray has started)."""
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", TRIAL_CLEANUP_S)
    requests = StopRequests()
    previous = signal.getsignal(signal.SIGTERM)
    requests.install()
    try:
        yield requests
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
