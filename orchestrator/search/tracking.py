"""Experiment tracking: MLflow and Weights & Biases, through Ray Tune's own logger callbacks.

Each trial becomes one run: its parameters (the trial's configuration), every metric it reports per
fine-tuning epoch, and its policy document (an MLflow artifact `policy.json`; a W&B summary field).

Decisions: both trackers are optional packages (the `tracking` extra); asking for one that is not installed
is one line. The default MLflow store is `mlruns/` beside the run directory, a local file store, which
MLflow 3 keeps in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`; we opt in for that default only (a
`sqlite:///…` or server URI works as given). W&B runs offline unless `WANDB_MODE` says otherwise (its
runs then land in `RUN/wandb/`), so nothing leaves the machine by default.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.errors import UserError
from orchestrator.files.fs import cache_root, is_uri
from orchestrator.search.config import SearchConfig
from orchestrator.search.prepare import Prepared

MLFLOW_DIR = "mlruns"
PROJECT = "compression-orchestrator"  # the W&B project; each search is a group in it
INSTALL = "pip install 'compression-orchestrator[tracking]'"


def default_mlflow_uri(prepared: Prepared) -> str:
    """`mlruns/` beside the run directory (in the local cache for a remote run)."""
    root = cache_root() / "mlruns" if is_uri(prepared.storage) else f"{prepared.storage}/{MLFLOW_DIR}"
    return f"file://{root}"


def tracking_callbacks(config: SearchConfig, prepared: Prepared) -> list[Any]:
    """The logger callbacks the configuration asks for (none by default)."""
    callbacks = []
    if config.run.mlflow is not None:
        callbacks.append(_mlflow_callback(config.run.mlflow or default_mlflow_uri(prepared), prepared.name))
    if config.run.wandb:
        callbacks.append(_wandb_callback(prepared))
    return callbacks


def _mlflow_callback(uri: str, experiment: str) -> Any:
    try:
        import mlflow  # noqa: F401
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError:
        raise UserError(f"--mlflow needs MLflow: {INSTALL}") from None
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    class PolicyMLflowLogger(MLflowLoggerCallback):
        """Ray's MLflow logger, plus each trial's policy document as the artifact `policy.json`."""

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            policy = (trial.last_result or {}).get("policy_json")
            if policy and trial in self._trial_runs:
                mlflow.MlflowClient(uri).log_text(self._trial_runs[trial], policy, "policy.json")
            super().log_trial_end(trial, failed)

    return PolicyMLflowLogger(tracking_uri=uri, experiment_name=experiment, tags={"search": experiment})


def _wandb_callback(prepared: Prepared) -> Any:
    try:
        import wandb  # noqa: F401
        from ray.air.integrations.wandb import WandbLoggerCallback
    except ImportError:
        raise UserError(f"--wandb needs Weights & Biases: {INSTALL}") from None
    os.environ.setdefault("WANDB_MODE", "offline")  # Ray's callback reads it here: no API key needed offline
    # and passed on: the logging actors run in other processes
    options: dict[str, Any] = {"mode": os.environ["WANDB_MODE"]}
    if not is_uri(prepared.run_dir):
        options["dir"] = prepared.run_dir  # offline runs in RUN/wandb/
    return WandbLoggerCallback(project=PROJECT, group=prepared.name, log_config=True, **options)
