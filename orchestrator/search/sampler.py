"""The study's samplers and vocabulary: per-trial seeded samplers, the journal, the accuracy-drop constraint.

The searcher that drives them inside Ray Tune is `orchestrator.search.searcher.JournalSearcher`.

Decisions, for resuming after the driver died at any moment:
- every trial is sampled by a fresh sampler seeded from (seed, trial index) (`TrialSeededSampler`), so a
  trial's parameters depend on the study's history only, not on how often the driver restarted;
- a sampler is described by a `SamplerRecipe` (plain data) wherever it must cross a process or a file:
  a sampler object holds state (a lock, in optuna 5.1) that is never pickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import BaseSampler

from orchestrator.errors import UserError
from orchestrator.pareto import shortfall
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


def sampler_recipe(name: str, *, num_trials: int) -> SamplerRecipe:
    """The recipe of the sampler `--sampler name` asks for."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; one of {', '.join(SAMPLERS)}")
    return SamplerRecipe(name, num_trials)


def make_sampler(recipe: SamplerRecipe, *, seed: int) -> BaseSampler:
    """The recipe's sampler, seeded per trial (see `TrialSeededSampler`)."""
    return TrialSeededSampler(recipe, seed)


def journal_storage(path: str | Path) -> optuna.storages.JournalStorage:
    """A journal-file Optuna storage (optuna-dashboard opens the file directly)."""
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@dataclass(frozen=True)
class AccuracyDropConstraint:
    """Excess of the trial's shortfall from the baseline over the allowed one, in the guard's units (points of
    a maximised metric, a fraction of a minimised one: `orchestrator.pareto.shortfall`; picklable)."""

    baseline: float
    max_drop: float
    metric: str = "validation"
    direction: str = "maximize"

    def __call__(self, result: dict) -> float:
        return shortfall(self.baseline, result[self.metric], self.direction) - self.max_drop


_ENTRY_START = b'{"op_code":'  # how Optuna's journal writes every entry


def repair_journal(path: str | Path) -> int:
    """Drop a torn last line of the Optuna journal at `path` (what a crash mid-append leaves; Optuna would
    append after it and corrupt the next entry) and return its length in bytes (0: the journal is whole).
    Any other damage (a line that is no journal entry, garbage appended) is one UserError line."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    if tail and not (tail.startswith(_ENTRY_START) or _ENTRY_START.startswith(tail)):
        cut = len(data)  # not the start of an entry: garbage, refused below
    for number, line in enumerate(data[:cut].splitlines(), 1):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("op_code"), int):
            raise UserError(
                f"{path} is damaged at line {number}: not an Optuna journal entry; restore it from a copy, or start "
                "a new run with another --name"
            )
    if cut < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(cut)
    return len(data) - cut


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
