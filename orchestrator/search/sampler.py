"""Optuna inside Ray Tune: the multi-objective sampler, the accuracy-drop constraint, failed trials, resume.

Ray's OptunaSearch tells Optuna a trial COMPLETE whenever it has a last result, even when the trial
raised, and it cannot pass constraints. `ConstrainedOptunaSearch` fixes both: errors and NaN objectives
become FAIL (never left RUNNING), and each completed trial carries its constraint value
(`Trial.set_constraint`, which Optuna's samplers read). It also runs configurations outside the
sampler's space (the uncompressed baseline) first, without showing them to Optuna, and never runs a sampled
configuration that compresses nothing (every layer group "off"): it tells Optuna that one PRUNED, without
values, so TPE ranks it among the worst, and samples again.

Decisions, for resuming after the driver died at any moment:
- every trial is sampled by a fresh sampler seeded from (seed, trial number) (`TrialSeededSampler`), so a
  trial's parameters depend on the study's history only, not on how often the driver restarted;
- Optuna trials the journal holds but Tune never recorded (asked, or even finished, after Tune's last
  snapshot) are adopted by the next trials Tune asks for, with their own parameters, instead of being
  failed and sampled again; a trial Optuna already knows the end of is never told twice; a skipped trial
  (`SKIPPED_ATTR`) is never adopted;
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from ray.tune.search.optuna import OptunaSearch

from orchestrator.errors import UserError
from orchestrator.search.config import SAMPLERS

CONSTRAINT = "accuracy_drop_excess"  # the trial's constraint: ≤ 0 means feasible
REFERENCE_ATTR = "reference"  # on a reference policy's trial: its name ("uniform int8", ...)
BASELINE_ATTR = "baseline"  # on the study: the uncompressed baseline's trial id, metrics and checkpoint
RECORDED = (
    "validation",
    "size_bytes",
    "latency_ms",
    "relative_latency",
    "flops",
    "params",
    "compression_ratio",
    "speedup",
)
SKIPPED_ATTR = "skipped"  # on a sampled trial never run: why (its parameters compress nothing)
MAX_SKIPPED = 50  # samples in a row that compress nothing before the searcher runs one anyway (the baseline again)
RETRY_ATTR = "retry_of"  # on a trial recording a successful re-run of a failed one: the failed trial's number


@dataclass(frozen=True)
class SamplerRecipe:
    """How to build one of the samplers for a seed: TPE (the default: best fronts at 24 and 64 trials in
    docs/BENCHMARKS.md), NSGA-II (population sized so the budget spans several generations) or random."""

    name: str
    num_trials: int

    def __call__(self, seed: int) -> BaseSampler:
        if self.name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, self.num_trials // 4)), seed=seed)
        if self.name == "tpe":
            startup = max(4, min(10, self.num_trials // 4))
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
        return optuna.samplers.RandomSampler(seed=seed)


class TrialSeededSampler(BaseSampler):
    """Samples each trial with a fresh sampler from `make(seed')`, seed' derived from (seed, trial index).

    Samplers keep a random state that advances with every draw; after a restart from an older snapshot that
    state is behind, and the same trial would get other parameters. Here a trial's draws depend only on its
    index and the study's history. The index is the trial's number less the retry records before it (see
    `RETRY_ATTR`), so re-running a failed trial does not shift the trials after it.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._by_number: dict[int, BaseSampler] = {}

    def _for(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> BaseSampler:
        if trial.number not in self._by_number:
            earlier = study.get_trials(deepcopy=False)[: trial.number]
            index = trial.number - sum(RETRY_ATTR in t.user_attrs for t in earlier)
            self._by_number[trial.number] = self._make((self._seed * 1_000_003 + index) % 2**32)
        return self._by_number[trial.number]

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict) -> dict:
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._for(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: Any, values: Sequence[float] | None
    ) -> None:
        self._for(study, trial).after_trial(study, trial, state, values)
        self._by_number.pop(trial.number, None)


def make_sampler(name: str, *, seed: int, num_trials: int) -> BaseSampler:
    """The named sampler, seeded per trial (see `TrialSeededSampler`)."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}")
    return TrialSeededSampler(SamplerRecipe(name, num_trials), seed)


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


_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
_ADOPTABLE = (optuna.trial.TrialState.RUNNING, *_FINISHED)


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that records constraints, never tells Optuna a failed trial is complete, suggests the
    `unsampled` configurations first without involving Optuna, skips samples `compresses` refuses, and resumes
    without repeating or failing trials the journal already holds (see the module's decisions)."""

    _compresses: Callable[[dict[str, Any]], bool] | None = None  # also for a searcher restored from older state

    def __init__(
        self,
        *args: Any,
        journal: str,
        constraint: AccuracyDropConstraint | None = None,
        unsampled: Sequence[dict[str, Any]] = (),
        references: Sequence[tuple[str, dict[str, Any]]] = (),
        compresses: Callable[[dict[str, Any]], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, storage=journal_storage(journal), **kwargs)
        if self._ot_study is not None:  # the dashboard and our tables name the objectives
            self._ot_study.set_metric_names(list(self._metric))
            for name, params in references:  # evaluated first, named so the dashboard shows which is which
                self._ot_study.enqueue_trial(params, user_attrs={REFERENCE_ATTR: name})
        self._journal = journal
        self._constraint = constraint
        self._unsampled = [dict(config) for config in unsampled]
        self._unsampled_trials: set[str] = set()
        self._compresses = compresses

    def suggest(self, trial_id: str) -> dict | None:
        if self._unsampled:
            self._unsampled_trials.add(trial_id)
            return self._unsampled.pop(0)
        for _ in range(MAX_SKIPPED):
            params = self._suggest_once(trial_id)
            if params is None or self._compresses is None or self._compresses(params) or not self._open(trial_id):
                return params
            self._skip(trial_id)
        return self._suggest_once(trial_id)

    def _suggest_once(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials:
            orphan = self._next_orphan()
            if orphan is not None:  # keeps its number and parameters: no second sampling, no FAIL entry
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, orphan._trial_id)
        return super().suggest(trial_id)

    def _open(self, trial_id: str) -> bool:
        """Whether Optuna still waits for the trial's result (an adopted orphan may have one already)."""
        number = self._ot_trials[trial_id].number
        return self._ot_study.get_trials(deepcopy=False)[number].state == optuna.trial.TrialState.RUNNING

    def _skip(self, trial_id: str) -> None:
        """Close the Optuna trial Tune's `trial_id` was about to run (it compresses nothing) and free the id."""
        ot_trial = self._ot_trials.pop(trial_id)
        ot_trial.set_user_attr(SKIPPED_ATTR, "compresses nothing")
        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)

    def _next_orphan(self) -> optuna.trial.FrozenTrial | None:
        """The first trial of the study no Tune trial of this search stands for (a failed attempt that was
        run again successfully is stood for by its retry)."""
        bound = {trial.number for trial in self._ot_trials.values()}
        trials = self._ot_study.get_trials(deepcopy=False, states=_ADOPTABLE)
        retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
        for trial in (t for t in trials if SKIPPED_ATTR not in t.user_attrs):
            stands_for = trial.user_attrs.get(RETRY_ATTR, trial.number)
            if stands_for not in bound and trial.number not in bound and trial.number not in retried:
                return trial
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._unsampled_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna how the trial ended, once: FAIL for errors and broken objectives, COMPLETE with the
        constraint otherwise. A trial Optuna already knows the end of (told before a restart) is not told
        again; one that had failed and now succeeded (re-run after the disk had filled) is recorded anew."""
        if trial_id in self._unsampled_trials:  # the baseline: not a sampled trial, recorded on the study
            if result and not error:
                self._ot_study.set_user_attr(BASELINE_ATTR, {"ray_trial_id": trial_id, **_record(result)})
            return None
        if trial_id not in self._ot_trials:
            return None
        ot_trial = self._ot_trials[trial_id]
        known = self._ot_study.get_trials(deepcopy=False)[ot_trial.number]
        values = None if error or not result else [result.get(m) for m in self._metric]
        good = values is not None and not any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)
        attrs = {"ray_trial_id": trial_id, **_record(result or {})}
        constraints = {CONSTRAINT: float(self._constraint(result))} if good and self._constraint else {}
        if known.state == optuna.trial.TrialState.RUNNING:
            for key, value in attrs.items():
                ot_trial.set_user_attr(key, value)
            for key, value in constraints.items():
                ot_trial.set_constraint(key, value)
            state = optuna.trial.TrialState.COMPLETE if good else optuna.trial.TrialState.FAIL
            self._ot_study.tell(ot_trial, values if good else None, state=state)
        elif known.state == optuna.trial.TrialState.FAIL and good and not self._retried(known.number):
            self._ot_study.add_trial(
                optuna.trial.create_trial(
                    params=known.params,
                    distributions=known.distributions,
                    values=values,
                    user_attrs={**known.user_attrs, **attrs, RETRY_ATTR: known.number},
                    constraints=constraints,
                )
            )
        self._completed_trials.add(trial_id)
        return None

    def _retried(self, number: int) -> bool:
        return any(t.user_attrs.get(RETRY_ATTR) == number for t in self._ot_study.get_trials(deepcopy=False))


def _record(result: dict[str, Any]) -> dict[str, Any]:
    """What the study keeps of a trial's result: its measurements and where its checkpoint is."""
    kept = {key: result[key] for key in RECORDED if isinstance(result.get(key), int | float)}
    return {**kept, "checkpoint": result.get("checkpoint_path")} if result.get("checkpoint_path") else kept


def study_exists(journal: str, study_name: str) -> bool:
    """Whether the journal already holds the study (a search resumed without Tune's state)."""
    if not Path(journal).is_file():
        return False
    return any(s.study_name == study_name for s in optuna.get_all_study_summaries(journal_storage(journal)))


def fail_orphaned_trials(journal: str, study_name: str) -> int:
    """Mark Optuna trials still RUNNING after the search as FAIL: they were asked for by a driver that died
    before Tune recorded them, and no trial will ever tell their result."""
    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal))
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in orphans:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)
