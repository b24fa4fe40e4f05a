"""Every benchmark runs in its quick mode, exits 0, prints a table and writes JSON with the expected keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON_KEYS = {"command", "date", "machine", "torch", "threads", "seed"}

BENCHES = [
    pytest.param(
        ["-m", "bench.techniques_digits", "--quick"],
        {"rows", "claims", "timing", "kd_settings", "load_average_before_timing"},
        id="techniques_digits",
    ),
    pytest.param(
        ["-m", "bench.front_quality", "--quick"],
        {"runs", "summary", "verdict", "baseline", "trials", "versions"},
        id="front_quality",
    ),
    pytest.param(
        ["-m", "bench.orchestration_cost", "--quick"],
        {"runs", "bare", "summary", "ray_start_s", "cluster_start_s", "versions"},
        id="orchestration_cost",
    ),
    pytest.param(
        ["-m", "bench.early_stopping", "--quick"],
        {"runs", "summary", "trials", "versions"},
        id="early_stopping",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, keys", BENCHES)
def test_bench_quick_mode_writes_json(command: list[str], keys: set[str], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, *command, "--out", str(out)],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|---" in proc.stdout
    report = json.loads(out.read_text())
    assert COMMON_KEYS | keys <= set(report)
