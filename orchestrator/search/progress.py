"""Console progress while trials run: one line per finished or failed trial."""

from __future__ import annotations

import sys
from typing import Any

from ray.tune import Callback


def _short(value: Any, key: str) -> str:
    if not isinstance(value, int | float):
        return "n/a"
    if key == "size_bytes":
        return f"{value / 1024:.1f} KiB"
    if key == "latency_ms":
        return f"{value:.3f} ms"
    if key == "flops":
        return f"{value / 1e6:.2f} MFLOP"
    return f"{value:.4f}"


class ProgressPrinter(Callback):
    """Prints `[done/total] trial …: objectives, techniques` as trials end (stderr)."""

    def __init__(self, total: int, objectives: tuple[str, ...]) -> None:
        self.total = total
        self.objectives = objectives
        self.done = 0

    def _print(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        result = trial.last_result or {}
        state = "done" if result.get("final") else "stopped early"
        numbers = "  ".join(f"{k} {_short(result.get(k), k)}" for k in self.objectives)
        techniques = result.get("techniques") or "baseline (no compression)"
        self._print(f"[{self.done}/{self.total}] {trial.trial_id} {state}: {numbers}  [{techniques}]")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        self._print(f"[{self.done}/{self.total}] {trial.trial_id} failed (see its error.txt in the run directory)")
