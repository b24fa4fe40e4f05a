"""Every benchmark runs in its quick mode, exits 0, prints a table, and writes JSON whose numbers hold
together: ratios match the sizes they come from, searches ran the trials asked for, the baseline is the one
the digits workload trains, hypervolumes are finite, early-stopped trials really stopped early."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.measure import measure_artifact
from tests.waiting import HANG_S

ROOT = Path(__file__).resolve().parents[1]
COMMON_KEYS = {"command", "date", "machine", "torch", "threads", "seed"}


def check_techniques(report: dict, baseline: dict) -> None:
    rows = report["rows"]
    assert rows[0]["name"] == "fp32 baseline" and rows[0]["size_bytes"] == baseline["size_bytes"]
    for row in rows:
        assert row["compression_ratio"] == pytest.approx(baseline["size_bytes"] / row["size_bytes"])
        assert row["reload_bitwise_equal"] is True, row["name"]
    assert report["claims"] and all(isinstance(c.get("holds"), bool) for c in report["claims"].values())


def check_front_quality(report: dict, baseline: dict) -> None:
    assert report["baseline"]["size_bytes"] == baseline["size_bytes"]
    assert report["baseline"]["validation"] == baseline["validation"]
    searches = [run for run in report["runs"] if run["kind"] == "search"]
    assert searches and all(len(run["rows"]) == report["trials"] for run in searches)  # quick: all complete
    for run in report["runs"]:
        assert math.isfinite(run["hv"]) and run["hv"] >= run["hv_near"] >= 0
        assert all(0 <= row["validation"] <= 1 and row["size_bytes"] > 0 for row in run["rows"])


def check_orchestration(report: dict, baseline: dict) -> None:
    rows = report["summary"]["rows"]
    bare = rows["bare loop"]["wall_s"]
    for name, row in rows.items():
        assert row["ratio_to_bare"] == pytest.approx(row["wall_s"] / bare), name
        assert row["trials_per_min"] == pytest.approx(60 * report["trials"] / row["wall_s"]), name
    assert all(len(run["trials"]) == report["trials"] for run in report["runs"])


def check_early_stopping(report: dict, baseline: dict) -> None:
    assert {run["asha"] for run in report["runs"]} == {False, True}
    for run in report["runs"]:
        assert run["baseline"]["size_bytes"] == baseline["size_bytes"]
        for trial in run["trials"]:
            if trial["status"] == "stopped_early":
                assert run["asha"] and trial["epochs_run"] < trial["epochs_planned"]
            elif trial["status"] == "completed":
                assert trial["epochs_run"] == trial["epochs_planned"]


def check_deploy(report: dict, baseline: dict) -> None:
    rows = report["rows"]
    assert rows[0]["kind"] == "baseline" and rows[0]["size_bytes"] == baseline["size_bytes"]
    assert {"front", "torch int8", "onnxruntime", "student", "grid"} <= {row["kind"] for row in rows}
    batches = [str(b) for b in report["preset"]["batch_sizes"]]
    assert all(rows[0]["speedup"][b]["median"] == 1.0 for b in batches)  # the baseline beside itself
    for row in rows:
        assert 0 <= row["test"] <= 1 and row["size_bytes"] > 0, row["name"]
        assert all(
            row["speedup"][b]["low"] <= row["speedup"][b]["median"] <= row["speedup"][b]["high"] for b in batches
        )
    fronts = {row["trial_id"] for row in report["evaluate_retiming"]}
    assert fronts and {(e["trial_id"], e["format"]) for e in report["exports"]} == {
        (t, f) for t in fronts for f in ("onnx", "torch-export")
    }
    assert all(e["passed"] for e in report["exports"])


BENCHES = [
    pytest.param("techniques_digits", {"rows", "claims", "timing", "kd_settings"}, check_techniques, id="techniques"),
    pytest.param("front_quality", {"runs", "summary", "verdict", "baseline"}, check_front_quality, id="front_quality"),
    pytest.param("orchestration_cost", {"runs", "bare", "summary"}, check_orchestration, id="orchestration_cost"),
    pytest.param("early_stopping", {"runs", "summary", "trials"}, check_early_stopping, id="early_stopping"),
    pytest.param("deploy", {"rows", "evaluate_retiming", "exports", "acceptance"}, check_deploy, id="deploy"),
]


@pytest.mark.slow
@pytest.mark.parametrize("bench, keys, check", BENCHES)
def test_bench_quick_mode(bench: str, keys: set[str], check: Callable, tmp_path: Path, digits, digits_baseline) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{bench}", "--quick", "--out", str(out)]
        + (["--storage-path", str(tmp_path / "runs")] if bench == "deploy" else []),
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|---" in proc.stdout
    report = json.loads(out.read_text())
    assert COMMON_KEYS | keys <= set(report)
    assert report["command"].startswith(f"python -m bench.{bench} --quick")
    baseline = {
        "size_bytes": measure_artifact(digits_baseline, digits.build_model()),
        "validation": digits.evaluate(digits_baseline, "validation"),
    }
    check(report, baseline)
    if bench == "deploy":  # the same front re-timed later, as `python -m bench.retime` does
        check_retime(report, tmp_path / "retime.json")


def check_retime(deployed: dict, out: Path) -> None:
    run = deployed["run_dir"]
    args = [sys.executable, "-m", "bench.retime", run, "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = json.loads(out.read_text())["runs"][run]
    assert [c["trial_id"] for c in checks] == [c["trial_id"] for c in deployed["evaluate_retiming"]]
    for check in checks:
        (low, median, high), (now_low, _, now_high) = check["recorded"], check["evaluate"]
        assert low <= median <= high and check["agrees"] == (now_low <= high and low <= now_high)
