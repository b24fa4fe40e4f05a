"""What a search records for people and tools beside its tables: an MLflow run and a W&B run per trial, and an
Optuna study that shows the baseline, the references by name, and where every trial's checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from orchestrator.artifacts import store
from orchestrator.search import SearchConfig, run
from orchestrator.search.sampler import BASELINE_ATTR, REFERENCE_ATTR, journal_storage
from orchestrator.search.space_options import options_from_json
from orchestrator.workloads import resolve_workload

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TRIALS = 4


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory):
    storage = tmp_path_factory.mktemp("tracked")
    space = options_from_json({"families": ["quantization"], "distillation": {"epochs": [1]}})
    outcome = run(
        SearchConfig(
            space=space,
            num_trials=TRIALS,
            concurrency=1,
            storage_path=str(storage),
            name="tracked",
            report=False,
            mlflow="",
            wandb=True,
        )
    )
    return storage, outcome


def test_mlflow_has_one_run_per_trial_with_params_metrics_and_policy(tracked):
    import mlflow

    storage, outcome = tracked
    client = mlflow.MlflowClient(f"file://{storage}/mlruns")
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(outcome.trials) == TRIALS
    by_trial = {run.data.tags["trial_name"].rsplit("_", 1)[-1]: run for run in runs}
    for row in outcome.trials:
        logged = by_trial[row.trial_id]
        assert logged.info.status == "FINISHED"
        assert logged.data.metrics["validation"] == pytest.approx(row.validation)
        assert logged.data.metrics["size_bytes"] == row.size_bytes
        assert "families" in logged.data.params
        policy = client.download_artifacts(logged.info.run_id, "policy.json")
        assert json.loads(Path(policy).read_text())["steps"] == json.loads(row.policy_json)["steps"]


def test_wandb_logs_each_trial_offline(tracked):
    storage, outcome = tracked
    offline = sorted((storage / "tracked" / "wandb").glob("offline-run-*"))
    assert len(offline) == TRIALS
    assert all(any(run.glob("*.wandb")) for run in offline)


def test_the_study_shows_the_baseline_references_and_checkpoints(tracked):
    storage, outcome = tracked
    study = optuna.load_study(study_name="tracked", storage=journal_storage(storage / "tracked" / "optuna-journal.log"))
    baseline_row = next(row for row in outcome.trials if row.role == "baseline")
    baseline = study.user_attrs[BASELINE_ATTR]
    assert baseline["ray_trial_id"] == baseline_row.trial_id and baseline["size_bytes"] == baseline_row.size_bytes
    assert sorted(t.user_attrs[REFERENCE_ATTR] for t in study.trials if REFERENCE_ATTR in t.user_attrs) == [
        "uniform 4-bit",
        "uniform int8",
    ]
    rows = {row.trial_id: row for row in outcome.trials}
    workload = resolve_workload("digits")
    for trial in study.trials:
        attrs = trial.user_attrs
        row = rows[attrs["ray_trial_id"]]
        assert attrs["validation"] == row.validation and attrs["size_bytes"] == row.size_bytes
        checkpoint = store.load(attrs["checkpoint"], workload)  # the path the study gives is a real checkpoint
        assert workload.evaluate(checkpoint.model, "validation") == row.validation
