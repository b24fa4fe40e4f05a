"""Optuna behind Tune's `Searcher` interface, on public APIs only: ask/tell on a study kept in a journal file.

Tune's own `OptunaSearch` tells Optuna a trial COMPLETE whenever it has a last result, even when the trial
raised, cannot pass constraints, and checkpoints itself by pickling the sampler (which broke with optuna
5.1.0: a sampler holding a lock cannot be pickled). `JournalSearcher` keeps its whole state in the Optuna
journal, so nothing of it is pickled or unpickled: Tune's searcher checkpoint is a JSON note, and pickling
the searcher (Tune puts it in `tuner.pkl`) keeps only its recipe.

Decisions, for resuming after the driver died at any moment (a resume always builds a new Tuner):
- errors and NaN objectives become FAIL (never left RUNNING); each completed trial carries its constraint
  value (`Trial.set_constraint`, which Optuna's samplers read);
- configurations outside the sampler's space (the uncompressed baseline) run first, never shown to Optuna;
  a sampled configuration that compresses nothing is told PRUNED (`SKIPPED_ATTR`), without values, so TPE
  ranks it among the worst, and sampled again;
- Optuna trials the journal holds but this search has not bound to a Tune trial (asked, or even finished,
  before the driver died) are adopted by the next trials Tune asks for, with their own parameters, instead
  of being failed and sampled again; a trial Optuna already knows the end of is never told twice; a skipped
  trial is never adopted; a trial that had failed and now succeeded is recorded anew (`RETRY_ATTR`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, TypedDict, TypeGuard

import optuna
from ray.tune.search import Searcher

from orchestrator.errors import UserError
from orchestrator.search.sampler import (
    BASELINE_ATTR,
    CONSTRAINT,
    RECORDED,
    REFERENCE_ATTR,
    RETRY_ATTR,
    SKIPPED_ATTR,
    AccuracyDropConstraint,
    SamplerRecipe,
    journal_storage,
    make_sampler,
)

MAX_SKIPPED = 50  # samples in a row that compress nothing before the searcher runs one anyway

_State = optuna.trial.TrialState
_FINISHED = (_State.COMPLETE, _State.FAIL, _State.PRUNED)
_ADOPTABLE = (_State.RUNNING, *_FINISHED)


class _Recipe(TypedDict):
    """What a `JournalSearcher` is built from again when unpickled (its keyword arguments but the rest)."""

    space: Callable[[Any], Any]
    metric: list[str]
    mode: list[str]
    sampler: SamplerRecipe
    seed: int
    journal: str
    study_name: str
    constraint: AccuracyDropConstraint | None
    compresses: Callable[[dict[str, Any]], bool] | None


class JournalSearcher(Searcher):
    """A multi-objective Optuna study behind Tune (see the module's decisions)."""

    def __init__(
        self,
        *,
        space: Callable[[Any], Any],
        metric: Sequence[str],
        mode: Sequence[str],
        sampler: SamplerRecipe,
        seed: int,
        journal: str,
        study_name: str,
        constraint: AccuracyDropConstraint | None = None,
        unsampled: Sequence[dict[str, Any]] = (),
        references: Sequence[tuple[str, dict[str, Any]]] = (),
        compresses: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        # Tune's `Searcher` annotates one metric and mode, but takes lists (its own `OptunaSearch` passes them)
        super().__init__(metric=list(metric), mode=list(mode))  # type: ignore[arg-type]
        self._recipe: _Recipe = {
            "space": space,
            "metric": list(metric),
            "mode": list(mode),
            "sampler": sampler,
            "seed": seed,
            "journal": journal,
            "study_name": study_name,
            "constraint": constraint,
            "compresses": compresses,
        }
        self._space = space
        self._objectives = list(metric)
        self._constraint = constraint
        self._compresses = compresses
        self._unsampled = [dict(config) for config in unsampled]
        self._unsampled_trials: set[str] = set()
        self._bound: dict[str, optuna.trial.Trial] = {}  # Tune trial id -> the Optuna trial it runs
        self._told: set[str] = set()
        self._study = self._open_study(references)

    def _open_study(self, references: Sequence[tuple[str, dict[str, Any]]] = ()) -> optuna.Study:
        recipe = self._recipe
        self._storage = journal_storage(recipe["journal"])
        new = not any(s.study_name == recipe["study_name"] for s in self._storage.get_all_studies())
        study = optuna.create_study(
            study_name=recipe["study_name"],
            storage=self._storage,
            sampler=make_sampler(recipe["sampler"], seed=recipe["seed"]),
            directions=["maximize" if m == "max" else "minimize" for m in recipe["mode"]],
            load_if_exists=True,
        )
        if new:  # the dashboard and our tables name the objectives; references run first
            study.set_metric_names(list(recipe["metric"]))
            for name, params in references:
                study.enqueue_trial(params, user_attrs={REFERENCE_ATTR: name})
        return study

    def __getstate__(self) -> dict[str, Any]:
        """Only the recipe and the in-flight bookkeeping: the study (and its sampler) live in the journal."""
        return {"recipe": self._recipe, "unsampled": self._unsampled, "metric": self.metric, "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        recipe = state["recipe"]
        self.__init__(  # type: ignore[misc]
            **{k: v for k, v in recipe.items() if k not in ("metric", "mode")},
            metric=recipe["metric"],
            mode=recipe["mode"],
            unsampled=state["unsampled"],
        )

    def save(self, checkpoint_path: str) -> None:
        """Tune's searcher checkpoint: a note that the state is the journal (nothing to unpickle, ever)."""
        note = {"searcher": type(self).__name__, "journal": self._recipe["journal"], "study": self._study.study_name}
        with open(checkpoint_path, "w") as handle:
            json.dump(note, handle)

    def restore(self, checkpoint_path: str) -> None:
        raise UserError("a search resumes from its Optuna journal, never from Tune's searcher checkpoint")

    def suggest(self, trial_id: str) -> dict | None:
        if self._unsampled:
            self._unsampled_trials.add(trial_id)
            return self._unsampled.pop(0)
        for _ in range(MAX_SKIPPED):
            params = self._suggest_once(trial_id)
            if self._compresses is None or self._compresses(params) or not self._open(trial_id):
                return params
            self._skip(trial_id)
        return self._suggest_once(trial_id)

    def _suggest_once(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self._bound:
            orphan = self._next_orphan()
            # an orphan keeps its number and parameters: no second sampling, no FAIL entry
            self._bound[trial_id] = self._trial(orphan) if orphan is not None else self._study.ask()
        trial = self._bound[trial_id]
        constants = self._space(trial)
        return {**trial.params, **(constants or {})}

    def _trial(self, number: int) -> optuna.trial.Trial:
        study_id = self._storage.get_study_id_from_name(self._study.study_name)
        trial_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, number)
        return optuna.trial.Trial(self._study, trial_id)

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        return self._study.get_trials(deepcopy=False)[number]

    def _open(self, trial_id: str) -> bool:
        """Whether Optuna still waits for the trial's result (an adopted orphan may have one already)."""
        return self._frozen(self._bound[trial_id].number).state == _State.RUNNING

    def _skip(self, trial_id: str) -> None:
        """Close the Optuna trial Tune's `trial_id` was about to run (it compresses nothing) and free the id."""
        trial = self._bound.pop(trial_id)
        trial.set_user_attr(SKIPPED_ATTR, "compresses nothing")
        self._study.tell(trial, state=_State.PRUNED)

    def _next_orphan(self) -> int | None:
        """The number of the first trial no Tune trial of this search stands for (a failed attempt that was
        run again successfully is stood for by its retry)."""
        bound = {trial.number for trial in self._bound.values()}
        trials = self._study.get_trials(deepcopy=False, states=_ADOPTABLE)
        retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
        for trial in (t for t in trials if SKIPPED_ATTR not in t.user_attrs):
            stands_for = trial.user_attrs.get(RETRY_ATTR, trial.number)
            if stands_for not in bound and trial.number not in bound and trial.number not in retried:
                return trial.number
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna how the trial ended, once: FAIL for errors and broken objectives, COMPLETE with the
        constraint otherwise. A trial Optuna already knows the end of (told before a restart) is not told
        again; one that had failed and now succeeded (re-run after the disk had filled) is recorded anew."""
        if trial_id in self._unsampled_trials:  # the baseline: not a sampled trial, recorded on the study
            if result and not error:
                self._study.set_user_attr(BASELINE_ATTR, {"ray_trial_id": trial_id, **_record(result)})
            return
        if trial_id not in self._bound or trial_id in self._told:
            return
        self._told.add(trial_id)
        trial = self._bound[trial_id]
        known = self._frozen(trial.number)
        values = None if error or not result else [result.get(m) for m in self._objectives]
        finite = values if values is not None and _all_finite(values) else None
        good = finite is not None
        attrs = {"ray_trial_id": trial_id, **_record(result or {})}
        constraints = {CONSTRAINT: float(self._constraint(result))} if good and self._constraint and result else {}
        if known.state == _State.RUNNING:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            for key, value in constraints.items():
                trial.set_constraint(key, value)
            self._study.tell(trial, finite, state=_State.COMPLETE if good else _State.FAIL)
        elif known.state == _State.FAIL and good and not self._retried(known.number):
            self._study.add_trial(
                optuna.trial.create_trial(
                    params=known.params,
                    distributions=known.distributions,
                    values=finite,
                    user_attrs={**known.user_attrs, **attrs, RETRY_ATTR: known.number},
                    constraints=constraints,
                )
            )

    def _retried(self, number: int) -> bool:
        return any(t.user_attrs.get(RETRY_ATTR) == number for t in self._study.get_trials(deepcopy=False))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _all_finite(values: list[Any]) -> TypeGuard[list[float]]:
    return all(_finite(v) for v in values)


def _record(result: dict[str, Any]) -> dict[str, Any]:
    """What the study keeps of a trial's result: its measurements and where its checkpoint is."""
    kept = {key: result[key] for key in RECORDED if _finite(result.get(key))}
    return {**kept, "checkpoint": result.get("checkpoint_path")} if result.get("checkpoint_path") else kept
