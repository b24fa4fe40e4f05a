"""Everything a report shows, read from a run directory's Parquet tables (and checkpoint existence)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.artifacts.tables import PARETO_FILE, TRIALS_FILE, ResultsError, read_table
from orchestrator.files.fs import directory_note, exists, locate

SENSITIVITY_FILE = "sensitivity.parquet"  # the sensitivity table of a search with the prior (search.prior)


@dataclass(frozen=True)
class RunData:
    """A run's trials, its front (as recorded in pareto.parquet) and facts, plus a note per checkpoint."""

    run_dir: str
    run_info: dict[str, Any]
    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    notes: dict[str, str] = field(default_factory=dict)  # trial id → "checkpoint missing", ...
    warnings: list[str] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # sensitivity.parquet's cells, if any
    sensitivity_info: dict[str, Any] = field(default_factory=dict)  # and its facts

    @property
    def metric(self) -> str:
        return str(self.run_info.get("metric") or "metric")


def _front_from_trials(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials flagged as Pareto, for runs whose pareto.parquet was never written."""
    return [{**t, "test": None, "checkpoint": None} for t in trials if t.get("pareto")]


def _feasible_front(front: list[dict[str, Any]], warnings: list[str]) -> list[dict[str, Any]]:
    """The front without infeasible rows: a model over the accuracy-drop limit is never shown as Pareto-optimal
    (it stays among the trials, marked infeasible); a warning names any such row."""
    kept = [row for row in front if row.get("feasible", True) is not False]
    dropped = [str(row.get("trial_id")) for row in front if row not in kept]
    if dropped:
        warnings.append(f"infeasible trials flagged as Pareto-optimal are not shown on the front: {', '.join(dropped)}")
    return kept


def load_run(run_dir: str) -> RunData:
    """Read trials.parquet (required) and pareto.parquet (falling back to the trials' Pareto flags)."""
    trials, run_info = read_table(run_dir, TRIALS_FILE)
    if not any(t.get("status") == "completed" for t in trials):
        raise ResultsError(f"no finished trials in {run_dir}")
    warnings = []
    if exists(run_dir, PARETO_FILE):
        front, pareto_info = read_table(run_dir, PARETO_FILE)
        run_info = {**run_info, **pareto_info}
    else:
        front = _front_from_trials(trials)
        warnings.append(f"{PARETO_FILE} is missing: the front is taken from {TRIALS_FILE}, without test metrics")
    front = _feasible_front(front, warnings)
    notes = {
        str(row["trial_id"]): directory_note(locate(run_dir, row["checkpoint"]))
        for row in front
        if row.get("checkpoint")
    }
    cells, facts = _sensitivity(run_dir, warnings)
    return RunData(run_dir, run_info, trials, front, {k: v for k, v in notes.items() if v}, warnings, cells, facts)


def _sensitivity(run_dir: str, warnings: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The sensitivity table's rows and facts ([] and {} without one; a damaged one is a warning, not a failure)."""
    if not exists(run_dir, SENSITIVITY_FILE):
        return [], {}
    try:
        return read_table(run_dir, SENSITIVITY_FILE)
    except ResultsError as exc:
        warnings.append(f"the sensitivity heat map is left out: {exc}")
        return [], {}
