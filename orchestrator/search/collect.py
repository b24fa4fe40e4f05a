"""After the search: trial rows, the Pareto front, Pareto checkpoints with test metrics, tables, report."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.artifacts import store
from orchestrator.artifacts.fs import join
from orchestrator.artifacts.tables import (
    PARETO_FILE,
    PARETO_SCHEMA,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    BaselineInfo,
    RunInfo,
    TrialRow,
    write_table,
)
from orchestrator.pareto import feasible_pareto_front
from orchestrator.policy import Policy
from orchestrator.search.config import SearchConfig, SearchOutcome
from orchestrator.search.prepare import Prepared
from orchestrator.search.space import SearchSpace
from orchestrator.search.trial import CHECKPOINT_SUBDIR
from orchestrator.workloads import Workload

PARETO_DIR = "pareto"
# The row fields a trial's final report carries under the same names.
_REPORTED = (
    "validation",
    "size_bytes",
    "latency_ms",
    "relative_latency",
    "flops",
    "params",
    "nonzero_params",
    "compression_ratio",
    "speedup",
    "speedup_low",
    "speedup_high",
    "wall_s",
    "device",
    "node_id",
    "techniques",
    "kernels_json",
)


def _trial_id(result: Any) -> str:
    """Tune's trial id (from the results, or from the trial directory name for trials that never reported)."""
    found = (result.metrics or {}).get("trial_id")
    if found:
        return found
    return Path(result.path).name.removeprefix("trial_")


def _role(config: dict[str, Any], unclaimed: list[tuple[str, str, dict[str, Any]]]) -> tuple[str, str | None]:
    """(role, name) of the first trial matching each fixed point (they are enqueued first); else "search"."""
    for index, (name, role, params) in enumerate(unclaimed):
        if config == params:
            del unclaimed[index]
            return role, name
    return "search", None


def _status(result: Any, complete: bool) -> str:
    """A trial without an error or a final report was stopped by ASHA, or cut off by an interruption."""
    if result.error:
        return "failed"
    if (result.metrics or {}).get("final"):
        return "completed"
    return "stopped_early" if complete else "interrupted"


def _policy(result: Any, space: SearchSpace) -> Policy:
    """The policy the trial reported, else the one its configuration describes (none before it started)."""
    reported = (result.metrics or {}).get("policy_json")
    if reported:
        return Policy.loads(reported)
    return space.policy(result.config) if result.config else Policy()


@dataclass(frozen=True)
class RowContext:
    """What turning Tune results into rows needs besides the results."""

    space: SearchSpace
    baseline_metric: float
    max_drop: float | None
    complete: bool  # False when the run was interrupted

    def within_drop(self, validation: Any) -> bool:
        return self.max_drop is None or (self.baseline_metric - validation) <= self.max_drop + 1e-12


def trial_row(result: Any, number: int, role: str, name: str | None, context: RowContext) -> TrialRow:
    """One trial's row from its Tune result."""
    metrics = dict(result.metrics or {})
    status = _status(result, context.complete)
    policy = _policy(result, context.space)
    return TrialRow(
        **{k: metrics.get(k) for k in _REPORTED},
        trial_id=_trial_id(result),
        number=number,
        role=role,
        status=status,
        feasible=bool(status == "completed" and context.within_drop(metrics.get("validation"))),
        pareto=False,
        epochs_completed=metrics.get("epoch"),
        policy_json=dataclasses.replace(policy, name=name).dumps() if name else policy.dumps(),
        error=None if not result.error else f"{type(result.error).__name__}: {result.error}"[:2000],
    )


def trial_rows(results: list[Any], context: RowContext) -> list[TrialRow]:
    """One row per trial (status, feasibility and metrics), in the order Tune created the trials."""
    fixed = context.space.fixed_points()
    rows = []
    for number, result in enumerate(results):
        role, name = _role(result.config or {}, fixed)
        rows.append(trial_row(result, number, role, name, context))
    return rows


def mark_front(rows: list[TrialRow], objectives: tuple[str, ...], directions: tuple[str, ...]) -> list[int]:
    """Flag the feasible, fully fine-tuned rows on the Pareto front; return their indices."""
    points = np.array([[_number(getattr(r, k)) for k in objectives] for r in rows], dtype=float)
    points = points.reshape(len(rows), -1)
    feasible = np.array([r.feasible for r in rows], dtype=bool)
    front = sorted(int(i) for i in feasible_pareto_front(points, list(directions), feasible)) if rows else []
    for index in front:
        rows[index].pareto = True
    return front


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def checkpoint_front(rows: list[TrialRow], results: list[Any], workload: Workload, run_dir: str) -> None:
    """Verify each Pareto trial's checkpoint, measure it once on the test split, and keep it in the run."""
    for row, result in zip(rows, results, strict=True):
        if result.checkpoint is None:  # interrupted before Tune registered it: a resume collects it again
            continue
        relative = f"{PARETO_DIR}/{row.trial_id}"
        with result.checkpoint.as_directory() as local:
            loaded = store.load(str(Path(local) / CHECKPOINT_SUBDIR), workload)
        test = workload.evaluate(loaded.model, "test")
        try:
            store.save(loaded.model, loaded.policy, {**loaded.metrics, "test": test}, workload, join(run_dir, relative))
        except store.CheckpointExistsError:  # written by an earlier collect of this run: keep it
            pass
        row.test = test
        row.checkpoint = relative


def _baseline_info(prepared: Prepared, rows: list[TrialRow]) -> BaselineInfo:
    baseline_row = next((r for r in rows if r.role == "baseline" and r.status == "completed"), None)
    measured = prepared.reference.measurements
    return BaselineInfo(
        validation=prepared.reference.metric,
        size_bytes=measured.size_bytes,
        # timed inside a trial, like every other row, when the baseline ran as one
        latency_ms=baseline_row.latency_ms if baseline_row else measured.latency.median_ms,
        flops=measured.flops,
        params=measured.params,
        test=prepared.workload.evaluate(prepared.baseline, "test", prepared.device),
        trial_id=baseline_row.trial_id if baseline_row else None,
    )


def collect(grid: Any, *, config: SearchConfig, prepared: Prepared, run_info: RunInfo) -> SearchOutcome:
    """Rows, front, checkpoints, Parquet tables and (optionally) the report."""
    results = list(grid)
    context = RowContext(prepared.space, prepared.reference.metric, config.max_accuracy_drop, run_info.complete)
    rows = trial_rows(results, context)
    front = mark_front(rows, run_info.objectives, run_info.directions)
    checkpoint_front([rows[i] for i in front], [results[i] for i in front], prepared.workload, prepared.run_dir)
    run_info = dataclasses.replace(
        run_info,
        baseline=_baseline_info(prepared, rows),
        wall_s=time.time() - prepared.started,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        versions=store.package_versions(),
    )
    pareto = [rows[i] for i in front]
    write_table(rows, TRIALS_SCHEMA, prepared.run_dir, TRIALS_FILE, run_info)
    write_table(pareto, PARETO_SCHEMA, prepared.run_dir, PARETO_FILE, run_info)
    outcome = SearchOutcome(prepared.run_dir, rows, pareto, run_info)
    if config.report and outcome.finished:  # a report needs one finished trial
        from orchestrator.report import write_report

        outcome.report = str(write_report(prepared.run_dir).html)
    return outcome
