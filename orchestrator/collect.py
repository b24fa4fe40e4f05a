"""After the search: trial rows, the Pareto front, Pareto checkpoints with test metrics, tables, report."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import store
from orchestrator.executor import Reference
from orchestrator.pareto import feasible_pareto_front
from orchestrator.policy import Policy
from orchestrator.results import PARETO_FILE, PARETO_SCHEMA, TRIALS_FILE, TRIALS_SCHEMA, join, write_table
from orchestrator.space import SearchSpace
from orchestrator.trial import CHECKPOINT_SUBDIR
from orchestrator.workloads import Workload

PARETO_DIR = "pareto"


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


def trial_rows(grid: Any, space: SearchSpace, max_drop: float | None, baseline_metric: float) -> list[dict]:
    """One row per trial (status, feasibility and metrics), in the order Tune created the trials."""
    fixed = space.fixed_points()
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        status = "failed" if result.error else ("completed" if metrics.get("final") else "stopped_early")
        validation = metrics.get("validation")
        role, name = _role(result.config or {}, fixed)
        policy = Policy.loads(metrics.get("policy_json") or space.policy(result.config).dumps())
        feasible = status == "completed" and (max_drop is None or (baseline_metric - validation) <= max_drop + 1e-12)
        rows.append(
            {
                **{k: metrics.get(k) for k in TRIALS_SCHEMA.names},
                "trial_id": _trial_id(result),
                "role": role,
                "status": status,
                "feasible": bool(feasible),
                "pareto": False,
                "epochs_completed": metrics.get("epoch"),
                "policy_json": dataclasses.replace(policy, name=name).dumps() if name else policy.dumps(),
                "error": None if not result.error else f"{type(result.error).__name__}: {result.error}"[:2000],
                "_result": result,
            }
        )
    for number, row in enumerate(rows):
        row["number"] = number
    return rows


def mark_front(rows: list[dict], objectives: list[str], directions: list[str]) -> list[dict]:
    """Flag (and return) the feasible, fully fine-tuned rows on the Pareto front."""
    points = np.array([[_number(r.get(k)) for k in objectives] for r in rows], dtype=float).reshape(len(rows), -1)
    feasible = np.array([r["feasible"] for r in rows], dtype=bool)
    front = feasible_pareto_front(points, directions, feasible) if rows else []
    for index in front:
        rows[index]["pareto"] = True
    return [rows[i] for i in front]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def checkpoint_front(front: list[dict], workload: Workload, run_dir: str) -> None:
    """Verify each Pareto trial's checkpoint, measure it once on the test split, and keep it in the run."""
    for row in front:
        relative = f"{PARETO_DIR}/{row['trial_id']}"
        destination = join(run_dir, relative)
        checkpoint = row["_result"].checkpoint
        with checkpoint.as_directory() as local:
            loaded = store.load(str(Path(local) / CHECKPOINT_SUBDIR), workload)
        test = workload.evaluate(loaded.model, "test")
        metrics = {**loaded.metrics, "test": test}
        try:
            store.save(loaded.model, loaded.policy, metrics, workload, destination)
        except store.CheckpointError:  # written by an earlier collect of this run: keep it
            pass
        row["test"] = test
        row["checkpoint"] = relative


def collect(
    grid: Any,
    *,
    workload: Workload,
    space: SearchSpace,
    reference: Reference,
    baseline_test: float,
    run_info: dict[str, Any],
    started: float,
    report: bool = True,
):
    """Rows, front, checkpoints, Parquet tables and (optionally) the report; returns a SearchOutcome."""
    from orchestrator.driver import SearchOutcome

    run_dir = run_info["run_dir"]
    rows = trial_rows(grid, space, run_info["max_accuracy_drop"], reference.metric)
    front = mark_front(rows, run_info["objectives"], run_info["directions"])
    checkpoint_front(front, workload, run_dir)
    baseline_row = next((r for r in rows if r["role"] == "baseline" and r["status"] == "completed"), None)
    run_info = {
        **run_info,
        "baseline": {
            "validation": reference.metric,
            "size_bytes": reference.size_bytes,
            # timed inside a trial, like every other row, when the baseline ran as one
            "latency_ms": baseline_row["latency_ms"] if baseline_row else reference.latency_ms,
            "flops": reference.flops,
            "params": reference.params,
            "test": baseline_test,
            "trial_id": baseline_row["trial_id"] if baseline_row else None,
        },
        "wall_s": time.time() - started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": store.package_versions(),
    }
    plain = [{k: v for k, v in r.items() if k != "_result"} for r in rows]
    pareto = [r for r in plain if r["pareto"]]
    write_table(plain, TRIALS_SCHEMA, run_dir, TRIALS_FILE, run_info)
    write_table(pareto, PARETO_SCHEMA, run_dir, PARETO_FILE, run_info)
    outcome = SearchOutcome(run_dir, plain, pareto, run_info)
    if report:
        from orchestrator.report import write_report

        outcome.report = str(write_report(run_dir).html)
    return outcome
