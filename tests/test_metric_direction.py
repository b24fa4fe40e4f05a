"""A lower-is-better metric (perplexity, a loss): the guard reads relative to the baseline, the search minimises
it, feasibility, the front and the report follow the workload's direction."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.artifacts.tables import PARETO_FILE, TRIALS_FILE, read_table
from orchestrator.pareto import feasible_pareto_front, guard_limit, shortfall
from orchestrator.report._compare import fmt_change
from orchestrator.report._format import metric_direction
from orchestrator.report._points import drop_limit
from orchestrator.report._table import format_front_table
from orchestrator.search.config import SearchConfig
from orchestrator.search.sampler import AccuracyDropConstraint
from orchestrator.search.sensitivity import DamagedTable, SensitivityTable, table_from_json
from tests.model_workloads import loss_workload
from tests.waiting import HANG_S

REPO = Path(__file__).resolve().parents[1]


def test_a_maximised_metric_falls_short_in_its_own_units():
    assert shortfall(0.90, 0.88) == pytest.approx(0.02)
    assert shortfall(0.90, 0.93) == pytest.approx(-0.03)
    assert guard_limit(0.90, 0.01) == pytest.approx(0.89)


def test_a_minimised_metric_falls_short_by_the_fraction_it_rose():
    assert shortfall(20.0, 21.0, "minimize") == pytest.approx(0.05)
    assert shortfall(20.0, 19.0, "minimize") == pytest.approx(-0.05)
    assert guard_limit(20.0, 0.05, "minimize") == pytest.approx(21.0)
    # a baseline at zero (a KL to itself) has no scale: the rise is read in the metric's units
    assert shortfall(0.0, 0.3, "minimize") == pytest.approx(0.3) and guard_limit(0.0, 0.3, "minimize") == 0.3
    with pytest.raises(ValueError, match="direction"):
        shortfall(1.0, 1.0, "up")


def test_the_guard_constraint_and_the_objective_directions_follow_the_metric():
    constraint = AccuracyDropConstraint(20.0, 0.05, direction="minimize")
    assert constraint({"validation": 20.5}) < 0 < constraint({"validation": 21.5})
    config = SearchConfig(objectives=("accuracy", "size"))
    assert config.directions() == ("maximize", "minimize")
    assert config.directions("minimize") == ("minimize", "minimize")


def test_the_front_of_a_minimised_metric_keeps_the_lowest_losses():
    points = np.array([[2.0, 100.0], [2.5, 50.0], [3.0, 100.0], [2.1, 40.0]])
    feasible = np.array([shortfall(2.0, loss, "minimize") <= 0.1 for loss in points[:, 0]])
    assert feasible.tolist() == [True, False, False, True]
    assert feasible_pareto_front(points, ["minimize", "minimize"], feasible).tolist() == [0, 3]


def _run_info(direction: str) -> dict:
    return {
        "metric": "perplexity",
        "objectives": ["validation", "size_bytes"],
        "directions": [direction, "minimize"],
        "max_accuracy_drop": 0.05,
        "baseline": {"validation": 20.0, "test": 21.0, "size_bytes": 1000, "latency_ms": 1.0, "role": "baseline"},
    }


def test_the_report_reads_the_recorded_direction():
    info = _run_info("minimize")
    assert metric_direction(info) == "minimize" and metric_direction({}) == "maximize"
    assert drop_limit(info) == pytest.approx(21.0)
    assert drop_limit(_run_info("maximize")) == pytest.approx(19.95)
    assert fmt_change(21.0, 20.0, "minimize") == "+5.00%"
    assert fmt_change(0.88, 0.90) == "−2.00 pt"
    row = {"trial_id": "t1", "validation": 20.8, "test": 21.42, "size_bytes": 250, "role": "trial"}
    table = format_front_table([row], info)
    assert "+4.00%" in table and "+2.00%" in table


def test_a_cached_sensitivity_table_with_a_bad_direction_is_refused():
    table = SensitivityTable("k", "loss", 2.0, 100, 10, (), "minimize")
    doc = table.to_json()
    assert table_from_json(doc, "t").direction == "minimize"
    with pytest.raises(DamagedTable, match="direction"):
        table_from_json({**doc, "direction": "sideways"}, "t")


def test_a_workload_with_an_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="metric_direction"):
        from dataclasses import replace

        replace(loss_workload(), metric_direction="higher")


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_minimises_a_lower_is_better_metric(tmp_path):
    """A smoke search on a workload scored by its cross-entropy: the study minimises it, the guard is relative."""
    command = [
        sys.executable, str(REPO / "search.py"), "--smoke-test", "--workload", "tests.model_workloads:loss_workload",
        "--storage-path", str(tmp_path), "--name", "loss", "--max-accuracy-drop", "0.02",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_S, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    trials, info = read_table(str(tmp_path / "loss"), TRIALS_FILE)
    pareto, _ = read_table(str(tmp_path / "loss"), PARETO_FILE)
    assert info["directions"][0] == "minimize"
    base = info["baseline"]["validation"]
    for row in trials:
        if row["status"] == "completed":
            assert row["feasible"] == (row["validation"] <= base * 1.02 + 1e-9), row
    assert pareto and all(row["validation"] <= base * 1.02 + 1e-9 for row in pareto)
    best = min(row["validation"] for row in pareto)
    assert math.isclose(best, min(r["validation"] for r in trials if r["feasible"]))
    assert "% above the baseline" in (tmp_path / "loss" / "report.html").read_text()
