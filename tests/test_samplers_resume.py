"""Every `--sampler` runs a smoke search through Tune's experiment checkpoints (which save and pickle the
searcher) and resumes it with a larger budget, computing no finished trial twice."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.artifacts.tables import TRIALS_FILE, read_table
from orchestrator.search.config import SAMPLERS

REPO = Path(__file__).resolve().parents[1]


def smoke(storage: Path, sampler: str, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "search.py"), "--smoke-test", "--sampler", sampler, "--no-report"]
    args += ["--storage-path", str(storage), "--name", "run", "--families", "quantization", "--concurrency", "1"]
    return subprocess.run([*args, *extra], capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_a_smoke_search_and_resumes_it(tmp_path, sampler):
    first = smoke(tmp_path, sampler, "--num-trials", "3")
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr[-4000:]
    assert list((tmp_path / "run").glob("searcher-state-*"))  # Tune checkpointed the searcher
    resumed = smoke(tmp_path, sampler, "--num-trials", "5", "--resume")
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-4000:]
    trials, info = read_table(str(tmp_path / "run"), TRIALS_FILE)
    assert info["complete"] is True and info["sampler"] == sampler and len(trials) == 5
    computed = collections.Counter(
        json.loads(line)["policy_json"]
        for path in (tmp_path / "run").glob("trial_*/result.json")
        for line in path.read_text().splitlines()
        if json.loads(line).get("final") and not json.loads(line).get("restored")
    )
    assert len(computed) == 5 and max(computed.values()) == 1  # each trial computed once, across both runs
