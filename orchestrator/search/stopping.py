"""Stopping a search that cannot go on: a full disk ends it at the first trial that ran out of space.

Decision: one object is both Tune's stopper and a callback (it sees trial errors as a callback and
answers `stop_all` as a stopper), so every later trial is not started only to fail the same way; the
driver then reports the full disk in one line, and `--resume` after space is freed keeps every finished
trial.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def out_of_space(error: BaseException | str | None) -> bool:
    """Whether an error (or its text, as Tune hands trial errors back) says the disk is full."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return error is not None and NO_SPACE in str(error)


class StopWhenStorageFull(Callback, Stopper):
    """Stops every trial once one failed for lack of disk space."""

    def __init__(self) -> None:
        self.full = False

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        path = trial.error_file  # the driver's copy, written before callbacks run (storage syncs later)
        if path and Path(path).is_file():
            self.full = self.full or out_of_space(Path(path).read_text(errors="replace"))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.full = False  # a resumed search starts hopeful: the space may have been freed

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.full


def ran_out_of_space(run_dir: str) -> bool:
    """Whether a trial of this (local) run failed for lack of space: a resume then runs failed trials again.
    For a run on object storage this is not looked up (False)."""
    if "://" in run_dir:
        return False
    errors = list(Path(run_dir).glob("trial_*/error.txt")) + list(Path(run_dir).glob("trial_*/error.pkl"))
    # an empty error file is one the full disk cut short (Tune writes a non-empty one otherwise)
    return any(p.stat().st_size == 0 or out_of_space(p.read_text(errors="replace")) for p in errors if p.is_file())
