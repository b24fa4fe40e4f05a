"""After the search: trial rows, the Pareto front, Pareto checkpoints with test metrics, tables, report."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.artifacts import store
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
from orchestrator.files.fs import exists, join
from orchestrator.measure import (
    Reference,
    compressed_metrics,
    measure_reference,
    torch_threads,
)
from orchestrator.pareto import feasible_pareto_front, shortfall
from orchestrator.policy import Policy
from orchestrator.search.config import SearchConfig, SearchOutcome
from orchestrator.search.pause import pause_point
from orchestrator.search.prepare import Prepared
from orchestrator.search.sampler import RECORDED
from orchestrator.search.space import SearchSpace
from orchestrator.search.trial import CHECKPOINT_SUBDIR, NOT_BELIEVED

PARETO_DIR = "pareto"
# The row fields a trial's final report carries under the same names.
_REPORTED = (*RECORDED, "nonzero_params", "speedup_low", "speedup_high", "wall_s", "device", "node_id", "techniques",
             "kernels_json")  # fmt: skip


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
    direction: str = "maximize"  # the workload's metric's

    def within_drop(self, validation: Any) -> bool:
        if self.max_drop is None:
            return True
        return shortfall(self.baseline_metric, validation, self.direction) <= self.max_drop + 1e-12


ERROR_CHARS = 2000


def error_summary(error: BaseException | None) -> str | None:
    """A failed trial's error for its row: the end of the text, where the exception's own line is (Ray's wrapped
    errors put the remote traceback first); the whole traceback stays in the trial's error.txt."""
    if not error:
        return None
    text = f"{type(error).__name__}: {error}".rstrip()
    return text if len(text) <= ERROR_CHARS else "…" + text[-(ERROR_CHARS - 1) :]


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
        error=error_summary(result.error),
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


# The speed a Pareto checkpoint's row and metrics carry after the search: re-timed alone (see checkpoint_front).
RETIMED = ("latency_ms", "latency_p10_ms", "latency_p90_ms", "baseline_latency_ms", "speedup", "speedup_low",
           "speedup_high", "speedup_rounds", "relative_latency")  # fmt: skip


def checkpoint_front(rows: list[TrialRow], results: list[Any], prepared: Prepared, config: SearchConfig) -> None:
    """Verify each Pareto trial's checkpoint, measure it once on the test split, re-time it, and keep it in the
    run.

    Trials are timed while other trials train on the same cores, which moves a paired ratio; the front is chosen on
    those numbers, then each Pareto checkpoint is re-timed beside the baseline with nothing else running and the
    trial's thread count, as `orchestrator evaluate` re-times it, and that is the speed its row and metrics keep
    (the trial's own ratio as `search_speedup`), with the paired rounds' own spread: `evaluate` re-times the same
    way and says whether its spread and this one agree."""
    if not any(result.checkpoint is not None for result in results):
        return
    workload = prepared.workload
    with torch_threads(max(1, int(config.resources.cpus_per_trial))):
        reference = measure_reference(
            workload, prepared.baseline, prepared.device, latency_batch_size=config.measure.latency_batch_size,
            target=prepared.reference.target,
        )  # fmt: skip
        for row, result in zip(rows, results, strict=True):
            if result.checkpoint is None:  # interrupted before Tune registered it: a resume collects it again
                continue
            row.checkpoint = f"{PARETO_DIR}/{row.trial_id}"
            destination = join(prepared.run_dir, row.checkpoint)
            metrics = _pareto_metrics(result, destination, prepared, reference, config)
            row.test = metrics["test"]
            row.search_speedup = metrics.get("search_speedup")
            for key in RETIMED:
                if hasattr(row, key) and key in metrics:
                    setattr(row, key, metrics[key])


def _pareto_metrics(
    result: Any,
    destination: str,
    prepared: Prepared,
    reference: Reference,
    config: SearchConfig,
) -> dict[str, Any]:
    """The metrics of the Pareto checkpoint at `destination`: written now (test metric and re-timed speed added
    to the trial's), or as an earlier collect wrote them."""
    workload = prepared.workload
    if exists(destination, store.MANIFEST):  # written by an earlier collect of this run: keep it
        return store.load(destination, workload).metrics
    with result.checkpoint.as_directory() as local:
        loaded = store.load(str(Path(local) / CHECKPOINT_SUBDIR), workload)
    model = loaded.model.to(prepared.device)
    test = workload.evaluate(model, "test")
    timed = compressed_metrics(
        model, workload, prepared.device, reference, prepared.baseline, config.measure.latency_batch_size,
        policy=loaded.policy,
    )  # fmt: skip
    metrics = {**loaded.metrics, **{k: timed[k] for k in RETIMED if k in timed}}
    metrics |= {"search_speedup": loaded.metrics.get("speedup"), "test": test}
    try:
        store.save(loaded.model, loaded.policy, metrics, workload, destination)
    except store.CheckpointExistsError:  # another collect wrote it meanwhile: keep that one
        return store.load(destination, workload).metrics
    return metrics


def _baseline_info(prepared: Prepared, rows: list[TrialRow]) -> BaselineInfo:
    baseline_row = next((r for r in rows if r.role == "baseline" and r.status == "completed"), None)
    measured = prepared.reference.measurements
    timed = baseline_row.latency_ms if baseline_row else None  # timed inside a trial, like every other row
    return BaselineInfo(
        validation=prepared.reference.metric,
        size_bytes=measured.size_bytes,
        latency_ms=timed if timed is not None else measured.latency.median_ms,
        flops=measured.flops,
        params=measured.params,
        test=prepared.workload.evaluate(prepared.baseline, "test", prepared.device),
        trial_id=baseline_row.trial_id if baseline_row else None,
    )


def _say_not_believed(results: list[Any]) -> None:
    """One line for each trial computed again because its finished record was not believed (the trial said it
    in its worker's log, which the console does not show)."""
    for result in results:
        why = (result.metrics or {}).get(NOT_BELIEVED)
        if why:
            print(f"note: trial {_trial_id(result)} was computed again: {why}", file=sys.stderr, flush=True)


def collect(grid: Any, *, config: SearchConfig, prepared: Prepared, run_info: RunInfo) -> SearchOutcome:
    """Rows, front, checkpoints, Parquet tables and (optionally) the report."""
    results = list(grid)
    _say_not_believed(results)
    context = RowContext(
        prepared.space,
        prepared.reference.metric,
        config.strategy.max_accuracy_drop,
        run_info.complete,
        prepared.workload.metric_direction,
    )
    rows = trial_rows(results, context)
    front = mark_front(rows, run_info.objectives, run_info.directions)
    if run_info.complete:  # a stopped run ends promptly: its resume re-times and checkpoints the front
        checkpoint_front([rows[i] for i in front], [results[i] for i in front], prepared, config)
    pause_point("collect")  # Pareto checkpoints written, tables not yet
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
    if config.run.report and outcome.finished:  # a report needs one finished trial
        from orchestrator.report import write_report

        outcome.report = str(write_report(prepared.run_dir).html)
    return outcome
