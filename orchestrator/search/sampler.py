"""Optuna inside Ray Tune: the multi-objective sampler, the accuracy-drop constraint, failed trials.

Ray's OptunaSearch tells Optuna a trial COMPLETE whenever it has a last result, even when the trial
raised, and it cannot pass constraints. `ConstrainedOptunaSearch` fixes both: errors and NaN objectives
become FAIL (never left RUNNING), and each completed trial carries its constraint value as a user
attribute that the sampler's `constraints_func` reads. It also runs configurations outside the
sampler's space (the uncompressed baseline) first, without showing them to Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from orchestrator.errors import UserError
from orchestrator.search.config import SAMPLERS

CONSTRAINT_ATTR = "accuracy_drop_excess"  # ≤ 0 means feasible


def constraint_of(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    """Optuna's constraints_func: the recorded excess accuracy drop (trials without one count as feasible)."""
    return (trial.user_attrs.get(CONSTRAINT_ATTR, 0.0),)


def make_sampler(name: str, *, seed: int, num_trials: int, constrained: bool) -> optuna.samplers.BaseSampler:
    """TPE (the default: best fronts at 24 and 64 trials in docs/BENCHMARKS.md), NSGA-II (population sized so
    the budget spans several generations) or random."""
    constraints = constraint_of if constrained else None
    if name == "nsga2":
        population = max(4, min(50, num_trials // 4))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed, constraints_func=constraints)
    if name == "tpe":
        startup = max(4, min(10, num_trials // 4))
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, constraints_func=constraints
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}")


def journal_storage(path: str | Path) -> optuna.storages.JournalStorage:
    """A journal-file Optuna storage (optuna-dashboard opens the file directly)."""
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@dataclass(frozen=True)
class AccuracyDropConstraint:
    """Excess of the trial's accuracy drop over the allowed one (picklable: Tune saves the searcher)."""

    baseline: float
    max_drop: float
    metric: str = "validation"

    def __call__(self, result: dict) -> float:
        return (self.baseline - result[self.metric]) - self.max_drop


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that records constraints, never tells Optuna a failed trial is complete, and suggests
    the `unsampled` configurations first without involving Optuna."""

    def __init__(
        self,
        *args: Any,
        constraint: AccuracyDropConstraint | None = None,
        unsampled: Sequence[dict[str, Any]] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self._ot_study is not None:  # the dashboard and our tables name the objectives
            self._ot_study.set_metric_names(list(self._metric))
        self._constraint = constraint
        self._unsampled = [dict(config) for config in unsampled]
        self._unsampled_trials: set[str] = set()

    def suggest(self, trial_id: str) -> dict | None:
        if self._unsampled:
            self._unsampled_trials.add(trial_id)
            return self._unsampled.pop(0)
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._unsampled_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._unsampled_trials:
            return None
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        values = [None if not result else result.get(m) for m in self._metric]
        broken = any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)
        if error or broken:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return None
        if self._constraint is not None:
            ot_trial.set_user_attr(CONSTRAINT_ATTR, float(self._constraint(result)))
        return super().on_trial_complete(trial_id, result, error)


def fail_orphaned_trials(journal: str, study_name: str) -> int:
    """Mark Optuna trials still RUNNING after the search as FAIL: they were asked for by a driver that died
    before Tune recorded them, and no trial will ever tell their result."""
    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal))
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in orphans:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)
