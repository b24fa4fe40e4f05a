"""Stopping a search that cannot go on: a full disk, or a node that cannot write the run directory, ends it at the
first trial that fails that way.

Decision: one object is both Tune's stopper and a callback (it reads a failed trial's error as a callback, on its
last failure and on one Tune is about to retry, and answers `stop_all` as a stopper), so no later trial is started
only to fail the same way and the budget is not burnt; the driver then reports the cause in one line, and
`--resume` once it is fixed keeps every finished trial.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from orchestrator.search.preflight import NO_SPACE, NodeCannotWrite

_UNWRITABLE = re.compile(rf"{NodeCannotWrite.__name__}: (?P<line>node .*)")


def out_of_space(error: BaseException | str | None) -> bool:
    """Whether an error (or its text, as Tune hands trial errors back) says the disk is full."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return error is not None and NO_SPACE in str(error)


def unwritable_node(error: str) -> str:
    """The one line of a trial error saying its node cannot write the run directory ('' when it says no such thing)."""
    match = _UNWRITABLE.search(error)
    return match["line"].strip() if match else ""


class StopOnFatalTrialError(Callback, Stopper):
    """Stops every trial once one failed for lack of disk space (`full`) or on a node that cannot write the run
    directory (`unwritable`: the error's line)."""

    def __init__(self) -> None:
        self.full = False
        self.unwritable = ""

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = _error_text(trial)
        self.full = self.full or out_of_space(text)
        self.unwritable = self.unwritable or unwritable_node(text)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # a retry would likely land on the same node again; a full disk waits for the retry's failure, so that
        # the failed attempt is told to the study (FAIL) and run again on --resume
        self.unwritable = self.unwritable or unwritable_node(_error_text(trial))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.full = False  # a resumed search starts hopeful: the space may have been freed, the node fixed
        self.unwritable = ""

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.full or bool(self.unwritable)


StopWhenStorageFull = StopOnFatalTrialError  # its former name


def _error_text(trial: Any) -> str:
    """The trial's error file as the driver holds it ('' when there is none yet)."""
    path = trial.error_file  # the driver's copy, written before callbacks run (storage syncs later)
    return Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""


def ran_out_of_space(run_dir: str) -> bool:
    """Whether a trial of this (local) run failed for lack of space: a resume then runs failed trials again.
    For a run on object storage this is not looked up (False)."""
    if "://" in run_dir:
        return False
    errors = list(Path(run_dir).glob("trial_*/error.txt")) + list(Path(run_dir).glob("trial_*/error.pkl"))
    # an empty error file is one the full disk cut short (Tune writes a non-empty one otherwise)
    return any(p.stat().st_size == 0 or out_of_space(p.read_text(errors="replace")) for p in errors if p.is_file())
