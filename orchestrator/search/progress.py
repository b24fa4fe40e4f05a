"""Console progress while trials run: one line per finished or failed trial, with what is running and an ETA.

Decisions: the count of ended trials is read from Tune's trial list, not kept in the callback, so it is
right after `--resume` (Tune restores this callback from the run, with whatever it had counted before);
plain text only, no colour codes, so a log file or a pipe reads as the terminal did.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

_ENDED = ("TERMINATED", "ERROR")


def _short(value: Any, key: str) -> str:
    if not isinstance(value, int | float):
        return "n/a"
    if key == "size_bytes":
        return f"{value / 1024:.1f} KiB"
    if key == "latency_ms":
        return f"{value:.3f} ms"
    if key == "relative_latency":
        return f"{value:.2f}x the baseline's time"
    if key == "flops":
        return f"{value / 1e6:.2f} MFLOP"
    return f"{value:.4f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressPrinter(Callback):
    """Prints `[ended/total] trial …: objectives [techniques]  (running N, ETA …)` as trials end (stderr)."""

    def __init__(self, total: int, objectives: tuple[str, ...]) -> None:
        self.total = total
        self.objectives = objectives
        self._started = time.monotonic()
        self._ended_before = 0

    def setup(
        self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **_: Any
    ) -> None:
        """Each session (a run or a resume): the budget as Tune now has it, the clock restarted."""
        self.total = total_num_samples or num_samples or self.total
        self._started = time.monotonic()
        self._ended_before = -1  # set from the trial list at the first event of this session

    def _status(self, trials: list, current: Any) -> tuple[str, str]:
        ended = sum(t.status in _ENDED or t is current for t in trials)
        if self._ended_before < 0:
            self._ended_before = ended - 1  # the trial whose end triggered this event is this session's
        running = sum(t.status == "RUNNING" and t is not current for t in trials)
        here = ended - self._ended_before
        remaining = max(0, self.total - ended)
        eta = (time.monotonic() - self._started) / here * remaining if here > 0 and remaining else 0.0
        tail = f"running {running}" + (f", ETA {_duration(eta)}" if remaining else "")
        return f"[{ended}/{max(self.total, ended)}]", tail

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        count, tail = self._status(trials, trial)
        result = trial.last_result or {}
        state = "done" if result.get("final") else "stopped early"
        state += " (kept from before)" if result.get("restored") else ""
        numbers = "  ".join(f"{k} {_short(result.get(k), k)}" for k in self.objectives)
        techniques = result.get("techniques") or "baseline (no compression)"
        _print(f"{count} {trial.trial_id} {state}: {numbers}  [{techniques}]  ({tail})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        count, tail = self._status(trials, trial)
        _print(f"{count} {trial.trial_id} failed (see its error.txt in the run directory)  ({tail})")


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
