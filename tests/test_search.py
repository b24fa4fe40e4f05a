"""The search end to end on Ray: smoke run, failures, a simulated cluster, and resume after SIGKILL."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch

from orchestrator.artifacts import store
from orchestrator.artifacts.tables import PARETO_FILE, TRIALS_FILE, read_table
from orchestrator.search import SearchConfig, run
from orchestrator.search.sampler import journal_storage
from orchestrator.search.space_options import options_from_json
from orchestrator.workloads import Workload, resolve_workload
from techniques.packed.layers import PackedLayer
from tests.test_report import NETWORK_PATTERNS, table_rows
from tests.waiting import HANG_S, simulated_cluster, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
ONE_EPOCH = {"distillation": {"epochs": [1]}}


def search_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "search.py"), *args]


def study_of(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(run_dir / "optuna-journal.log"))


def test_smoke_test_leaves_checkpoints_that_reproduce_their_metrics(tmp_path):
    result = subprocess.run(
        search_command("--smoke-test", "--storage-path", str(tmp_path), "--name", "smoke"),
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "smoke"
    trials, info = read_table(str(run_dir), TRIALS_FILE)
    pareto, _ = read_table(str(run_dir), PARETO_FILE)
    assert len(trials) == 6 and {r["status"] for r in trials} == {"completed"}
    assert [r["role"] for r in trials].count("baseline") == 1
    assert info["objectives"] == ["validation", "size_bytes"]
    assert "Pareto front" in result.stdout and f"run directory: {run_dir}" in result.stdout
    # the console holds our own lines only: Ray's and Tune's go to search.log; no colour codes in a pipe
    assert "\x1b" not in result.stdout + result.stderr
    assert not [line for line in result.stderr.splitlines() if "WARNING" in line or "INFO" in line]
    assert "ray.tune" in (run_dir / "search.log").read_text()
    assert [int(line.split("/")[0].strip("[")) for line in result.stderr.splitlines() if line.startswith("[")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    # the default accuracy guard: nothing on the front is more than 5 points below the baseline
    assert all(row["validation"] >= info["baseline"]["validation"] - 0.05 for row in pareto)

    workload = resolve_workload("digits")
    assert pareto
    for row in pareto:
        checkpoint = store.load(str(run_dir / row["checkpoint"]), workload)
        assert workload.evaluate(checkpoint.model, "validation") == row["validation"]
        assert workload.evaluate(checkpoint.model, "test") == row["test"] == checkpoint.metrics["test"]
        files = sum((run_dir / row["checkpoint"] / name).stat().st_size for name in store.ARTIFACT_FILES)
        assert files == row["size_bytes"]

    study = study_of(run_dir, "smoke")
    assert study.metric_names == ["validation", "size_bytes"]
    # the baseline runs outside the sampler: Optuna holds the 5 compressed trials only
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    check_report_of_real_run(run_dir, pareto)


def check_report_of_real_run(run_dir: Path, pareto: list[dict]) -> None:
    """The report of a real search lists every Pareto trial with its checkpoint and the Parquet numbers."""
    html = (run_dir / "report.html").read_text()
    for pattern in NETWORK_PATTERNS:
        assert not re.search(pattern, html, re.IGNORECASE), pattern
    rows = table_rows(html)
    for row in pareto:
        cells = rows[row["trial_id"]]
        assert float(cells[1][0]) == row["test"] and float(cells[2][0]) == row["validation"]
        assert int(cells[3][0]) == row["size_bytes"]
        assert cells[-1][1] == row["checkpoint"]
    summary = (run_dir / "summary.md").read_text()
    assert all(f"| {row['trial_id']} |" in summary for row in pareto)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class FlakyWorkload(Workload):
    """digits, except that quantised 8-bit models score NaN and 4-bit models crash the evaluation."""

    def evaluate(self, model, split="validation", device=None):  # noqa: ANN001, ANN201
        bits = {m.bits for m in model.modules() if isinstance(m, PackedLayer)}
        if 4 in bits:
            raise RuntimeError("injected failure")
        if 8 in bits:
            return float("nan")
        return super().evaluate(model, split, device)


def make_flaky() -> FlakyWorkload:
    digits = resolve_workload("digits")
    return FlakyWorkload(**{f.name: getattr(digits, f.name) for f in dataclasses.fields(Workload) if f.init})


def test_failing_and_nan_trials_are_failed_and_the_search_completes(tmp_path, local_ray, monkeypatch):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.syspath_prepend(str(REPO))
    config = SearchConfig(
        workload="tests.test_search:make_flaky",
        space=options_from_json({"families": ["quantization"], "choices": {"bits": [4, 8, 32]}}),
        num_trials=5,
        storage_path=str(tmp_path),
        name="flaky",
        max_failures=0,
        report=False,
    )
    outcome = run(config)
    by_role = {}
    for row in outcome.trials:
        by_role.setdefault(row.role, []).append(row)
    # the references come first: uniform int8 (NaN) and uniform 4-bit (raises); the baseline succeeds
    assert len(outcome.trials) == 5
    statuses = {json.loads(r.policy_json)["steps"][0]["_data"]["bits"]["conv1"]: r.status for r in by_role["reference"]}
    assert statuses == {8: "failed", 4: "failed"}
    assert all("injected failure" in r.error or "not finite" in r.error for r in by_role["reference"])
    assert by_role["baseline"][0].status == "completed"
    assert not any(r.pareto for r in outcome.trials if r.status != "completed")
    states = [t.state for t in study_of(tmp_path / "flaky", "flaky").trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.FAIL) == sum(r.status == "failed" for r in outcome.trials) >= 2


def test_trials_spread_over_a_simulated_multi_node_cluster(tmp_path):
    """Trials run on the worker nodes; where CUDA does not work, a trial given a (logical) GPU fails with the
    reason instead of quietly running on the CPU."""
    import ray

    ray.shutdown()
    cluster = simulated_cluster(*[{"num_cpus": 1, "num_gpus": 1}] * 3)
    workers = {node.node_id for node in cluster.worker_nodes}  # read now: shutting the cluster down empties it
    cuda = torch.cuda.is_available()

    def search(name: str, trials: int, gpus: float):  # noqa: ANN202
        space = options_from_json({"families": ["quantization", "unstructured_pruning"], **ONE_EPOCH})
        return run(
            SearchConfig(
                address=cluster.address,
                space=space,
                num_trials=trials,
                gpus_per_trial=gpus,
                concurrency=3,
                storage_path=str(tmp_path),
                name=name,
                max_failures=0,
                report=False,
            )
        )

    try:
        outcome = search("cluster", 6, 1 if cuda else 0)
        on_gpu = None if cuda else search("no-cuda", 2, 1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    used = {row.node_id for row in outcome.trials}
    assert used <= workers and len(workers) == 3  # the CPU-less head runs no trial
    assert len(used) >= 2
    assert all(row.status == "completed" for row in outcome.trials)
    assert all(row.device == ("cuda" if cuda else "cpu") for row in outcome.trials)
    if on_gpu is not None:
        assert [row.status for row in on_gpu.trials] == ["failed", "failed"]
        assert all("CUDA is not usable" in row.error for row in on_gpu.trials)


def finished_trials(run_dir: Path) -> list[Path]:
    done = []
    for result_file in run_dir.glob("trial_*/result.json"):
        if any(json.loads(line).get("final") for line in result_file.read_text().splitlines() if line.strip()):
            done.append(result_file)
    return done


def test_resume_after_sigkill_finishes_the_budget_without_rerunning_trials(tmp_path):
    args = [
        "--storage-path",
        str(tmp_path),
        "--name",
        "resume",
        "--families",
        "quantization,unstructured_pruning",
        "--num-trials",
        "8",
        "--concurrency",
        "1",
        "--no-report",
    ]
    (tmp_path / "space.json").write_text(json.dumps({**ONE_EPOCH, "distillation": {"epochs": [2]}}))
    args += ["--search-space", str(tmp_path / "space.json")]
    driver = subprocess.Popen(
        search_command(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ,
    )
    run_dir = tmp_path / "resume"

    def records() -> list[Path]:  # written by each trial as it ends (Tune's own result files sync later)
        return list(run_dir.glob("finished/*/final_result.json"))

    wait_for(lambda: len(records()) >= 3 or driver.poll() is not None, "3 finished trials or the driver's exit")
    assert driver.poll() is None, "the search ended before it could be interrupted"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)  # Ray's own processes, orphaned by the driver's death
    interrupted = {p.parent.name for p in records()}
    assert 3 <= len(interrupted) < 8

    result = subprocess.run(
        search_command(*args, "--resume"), capture_output=True, text=True, timeout=HANG_S, env=os.environ
    )
    assert result.returncode == 0, result.stderr[-4000:]
    trials, _ = read_table(str(run_dir), TRIALS_FILE)
    assert len(trials) == 8 and {r["status"] for r in trials} == {"completed"}
    assert len({r["trial_id"] for r in trials}) == 8
    computed = collections.Counter()  # per policy, over every trial directory of both sessions
    for result_file in finished_trials(run_dir):
        results = [json.loads(line) for line in result_file.read_text().splitlines()]
        computed.update(r["policy_json"] for r in results if r.get("final") and not r.get("restored"))
    assert set(computed.values()) == {1}  # no finished trial was computed twice; after the resume, only reported

    def unnamed(policy_json: str) -> str:
        doc = json.loads(policy_json)
        doc.pop("name", None)
        return json.dumps(doc, indent=2)

    kept = {unnamed(json.loads(p.read_text())["policy_json"]) for p in records()}
    assert {unnamed(r["policy_json"]) for r in trials} <= kept  # each trial's result is its one finished record
    assert {p.parent.name for p in records()} >= interrupted
    states = [t.state for t in study_of(run_dir, "resume").trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 7  # all but the baseline, run outside the sampler
    assert optuna.trial.TrialState.RUNNING not in states


def test_asha_stops_weak_fine_tunes_and_stopped_trials_stay_off_the_front(tmp_path, local_ray):
    outcome = run(
        SearchConfig(
            space=options_from_json(
                {
                    "families": ["quantization", "unstructured_pruning", "distillation"],
                    "distillation": {"epochs": [4]},
                    "choices": {"bits": [2, 3, 8], "sparsity": [0.9, 0.95]},
                }
            ),
            num_trials=10,
            concurrency=1,
            asha=True,
            storage_path=str(tmp_path),
            name="asha",
            report=False,
        )
    )
    stopped = [r for r in outcome.trials if r.status == "stopped_early"]
    assert stopped, "ASHA stopped no trial"
    assert not any(r.pareto for r in stopped)
    assert all(r.epochs_completed < 4 for r in stopped)  # stopped at an earlier rung, never after all the work
    assert all(r.status == "completed" for r in outcome.trials if r.pareto)
    assert any(r.status == "completed" and r.epochs_completed == 4 for r in outcome.trials)


def test_resume_extends_a_finished_search_and_counts_progress_across_sessions(tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"families": ["quantization"], **ONE_EPOCH}))
    common = ["--storage-path", str(tmp_path), "--name", "grow", "--search-space", str(space), "--no-report"]
    first = subprocess.run(search_command(*common, "--num-trials", "3"), capture_output=True, text=True, timeout=HANG_S)
    assert first.returncode == 0, first.stderr[-4000:]
    same = subprocess.run(search_command(*common, "--resume"), capture_output=True, text=True, timeout=HANG_S)
    assert same.returncode == 0, same.stderr[-4000:]  # no --num-trials: the run's own budget, nothing new
    trials, _ = read_table(str(tmp_path / "grow"), TRIALS_FILE)
    assert len(trials) == 3
    more = subprocess.run(
        search_command(*common, "--resume", "--num-trials", "5"), capture_output=True, text=True, timeout=HANG_S
    )
    assert more.returncode == 0, more.stderr[-4000:]
    trials, info = read_table(str(tmp_path / "grow"), TRIALS_FILE)
    assert len(trials) == 5 and info["num_trials"] == 5 and {t["status"] for t in trials} == {"completed"}
    progress = [line.split()[0] for line in more.stderr.splitlines() if line.startswith("[")]
    assert progress[-1] == "[5/5]" and all(p.endswith("/5]") for p in progress)
    kept = [line for line in more.stderr.splitlines() if "kept from before" in line]
    assert len(kept) == 3  # the first three were reported again, not recomputed
    shrink = subprocess.run(
        search_command(*common, "--resume", "--num-trials", "2"), capture_output=True, text=True, timeout=HANG_S
    )
    assert shrink.returncode == 2 and "below this run's budget of 5" in shrink.stderr
